"""The actor system: orderly shutdown, lookup, dead letters, statistics, error propagation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from runtime import (
    Actor,
    ActorRef,
    Message,
    MessageFailedError,
    Supervision,
    VirtualClock,
    open_system,
)


class Note(Message, frozen=True, kw_only=True, tag="test.system.note"):
    n: int = 0


class Boom(Message, frozen=True, kw_only=True, tag="test.system.boom"):
    pass


class Logged(Actor[object]):
    """Appends each message's ``n`` and, on stop, its own path to a shared log."""

    def __init__(self, log: list[object], children: tuple[str, ...] = ()) -> None:
        self.log = log
        self.children = children

    async def on_start(self) -> None:
        for name in self.children:
            grandchildren = ("grandchild",) if name == "c2" else ()
            await self.context.spawn(self._child_factory(grandchildren), name=name)

    def _child_factory(self, children: tuple[str, ...]) -> Callable[[], Logged]:
        return lambda: Logged(self.log, children)

    async def receive(self, message: object) -> Any:
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        if isinstance(message, Note):
            self.log.append(message.n)
        return None

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.context.path}")


# -- orderly shutdown --------------------------------------------------------------------------


async def test_top_level_actors_stop_newest_first() -> None:
    """Leaving open_system stops top-level actors in reverse spawn order."""
    log: list[object] = []
    async with open_system() as system:
        for name in ("a", "b", "c"):
            await system.spawn(lambda: Logged(log), name=name)
    assert log == ["stop /c", "stop /b", "stop /a"]
    assert system.statistics().actors == 0


async def test_children_stop_before_their_parent() -> None:
    """A stopping actor stops its children first, newest first, each after its own children."""
    log: list[object] = []
    async with open_system() as system:
        await system.spawn(lambda: Logged(log, ("c1", "c2", "c3")), name="p")
        assert system.lookup("/p/c2/grandchild") is not None
        assert system.statistics().actors == 5
    assert log == [
        "stop /p/c3",
        "stop /p/c2/grandchild",
        "stop /p/c2",
        "stop /p/c1",
        "stop /p",
    ]
    assert system.statistics().actors == 0


async def test_queued_messages_are_handled_before_on_stop() -> None:
    """Messages already queued when shutdown starts are handled, then on_stop runs."""
    log: list[object] = []
    async with open_system() as system:
        ref = await system.spawn(lambda: Logged(log), name="worker")
        for n in range(10):
            ref.tell_nowait(Note(n=n))
    assert log == [*range(10), "stop /worker"]
    assert system.statistics().dead_letters == 0


async def test_on_stop_runs_exactly_once() -> None:
    """An actor that stops itself, is stopped again and then shut down runs on_stop once."""
    stops: list[str] = []

    class SelfStopping(Actor[object]):
        async def receive(self, message: object) -> Any:
            self.context.stop()
            self.context.stop()
            return None

        async def on_stop(self) -> None:
            stops.append(self.context.path)

    async with open_system() as system:
        ref = await system.spawn(SelfStopping, name="s")
        with anyio.fail_after(5):
            ref.tell_nowait(Note())
            await system.stop(ref)
            await system.stop(ref)
    assert stops == ["/s"]


async def test_stop_waits_until_the_actor_is_gone() -> None:
    """system.stop() returns after on_stop ran and the actor is unregistered."""
    log: list[object] = []
    async with open_system() as system:
        ref = await system.spawn(lambda: Logged(log, ("kid",)), name="p")
        with anyio.fail_after(5):
            await system.stop(ref)
        assert log == ["stop /p/kid", "stop /p"]
        assert system.lookup("/p") is None
        assert system.lookup("/p/kid") is None
        assert not ref.is_alive
        assert system.statistics().actors == 0


async def test_stuck_actor_is_cancelled_after_the_shutdown_timeout() -> None:
    """An actor stuck past the shutdown timeout is cancelled; on_stop runs, its queue is lost."""
    log: list[object] = []
    entered = anyio.Event()

    class Stuck(Logged):
        async def receive(self, message: object) -> Any:
            entered.set()
            await anyio.sleep_forever()

    with anyio.fail_after(5):
        async with open_system(shutdown_timeout=0.05) as system:
            ref = await system.spawn(lambda: Stuck(log), name="stuck")
            ref.tell_nowait(Note(n=1))
            ref.tell_nowait(Note(n=2))
            await entered.wait()
    assert log == ["stop /stuck"]
    assert [d.message for d in system.recent_dead_letters] == [Note(n=2)]
    assert system.statistics().actors == 0


async def test_an_exception_in_the_body_propagates_after_shutdown() -> None:
    """An error raised inside open_system propagates unwrapped once the actors have stopped."""
    log: list[object] = []

    async def body() -> None:
        async with open_system() as system:
            await system.spawn(lambda: Logged(log), name="a")
            raise LookupError("body failed")

    with pytest.raises(LookupError, match="body failed"):
        await body()
    assert log == ["stop /a"]


async def test_failing_on_stop_is_logged_and_shutdown_continues() -> None:
    """An on_stop that raises is logged once; the other actors still stop."""
    log: list[object] = []

    class BadStop(Logged):
        async def on_stop(self) -> None:
            raise OSError("cannot flush")

    with capture_logs() as events:
        async with open_system() as system:
            await system.spawn(lambda: Logged(log), name="a")
            await system.spawn(lambda: BadStop(log), name="bad")
    assert log == ["stop /a"]
    failed = [e for e in events if e["event"] == "actor_hook_failed"]
    assert [(e["actor"], e["hook"], e["error"]) for e in failed] == [
        ("/bad", "on_stop", "OSError('cannot flush')")
    ]


async def test_restart_stops_children_so_on_start_can_recreate_them() -> None:
    """A restart stops the old instance's children (newest first) before the new on_start."""
    log: list[object] = []
    policy = Supervision(backoff_min=0.0, backoff_max=0.0)
    async with open_system(default_supervision=policy) as system:
        parent = await system.spawn(lambda: Logged(log, ("c1", "c2")), name="p")
        old_child = system.lookup("/p/c1")
        with anyio.fail_after(5):
            parent.tell_nowait(Note(n=1))
            with pytest.raises(MessageFailedError):
                await parent.ask(Boom(), timeout=5)
            parent.tell_nowait(Note(n=2))
            await parent.ask(Note(n=3), timeout=5)
        new_child = system.lookup("/p/c1")
        assert old_child is not None
        assert new_child is not None
        assert not old_child.is_alive
        assert new_child.is_alive
        stats = system.statistics()
    one_restart = ["stop /p/c2/grandchild", "stop /p/c2", "stop /p/c1", "stop /p"]
    assert log == [1, *one_restart, *one_restart, 2, 3, *one_restart]
    assert (stats.actors, stats.failures, stats.restarts) == (4, 2, 2)


# -- lookup, dead letters, statistics ------------------------------------------------------------


async def test_lookup_finds_live_actors_by_path() -> None:
    """lookup() resolves nested paths to live actors and returns None otherwise."""
    log: list[object] = []
    async with open_system() as system:
        parent = await system.spawn(lambda: Logged(log, ("c1", "c2")), name="p")
        assert system.lookup("/p") == parent
        grandchild = system.lookup("/p/c2/grandchild")
        assert grandchild is not None
        assert grandchild.path == "/p/c2/grandchild"
        assert system.lookup("p/c1") == system.lookup("/p/c1")
        assert system.lookup("/p/nope") is None
        assert system.lookup("/nope/c1") is None


async def test_dead_letters_are_logged_counted_and_the_recent_ones_kept() -> None:
    """Every dead letter is counted and logged; the most recent 256 are kept."""
    async with open_system() as system:
        ref: ActorRef[object] = await system.spawn(lambda: Logged([]), name="gone")
        await system.stop(ref)
        with capture_logs() as events:
            for n in range(300):
                ref.tell_nowait(Note(n=n))
        assert system.statistics().dead_letters == 300
        recent = list(system.recent_dead_letters)
        assert len(recent) == 256
        assert [d.message for d in recent] == [Note(n=n) for n in range(44, 300)]
    logged = [e for e in events if e["event"] == "dead_letter"]
    assert len(logged) == 300
    assert logged[0] == {
        "event": "dead_letter",
        "log_level": "warning",
        "component": "runtime.system",
        "recipient": "/gone",
        "message_type": "Note",
        "reason": "actor stopped",
    }


async def test_statistics_count_a_whole_scenario() -> None:
    """statistics() reports exact counts of actors, spawns, failures, restarts, timers, letters."""
    clock = VirtualClock()
    policy = Supervision(backoff_min=0.0, backoff_max=0.0)
    log: list[object] = []

    class WithTimer(Logged):
        async def on_start(self) -> None:
            self.context.start_timer("once", Note(n=100), delay=5.0)
            self.context.start_timer("never", Note(n=200), delay=50.0)

    async with open_system(clock=clock, default_supervision=policy) as system:
        assert system.statistics().spawned == 0
        a = await system.spawn(lambda: Logged(log, ("c1",)), name="a")
        b = await system.spawn(lambda: WithTimer(log), name="b")
        with anyio.fail_after(5):
            await clock.advance(5.0)
            with pytest.raises(MessageFailedError):
                await a.ask(Boom(), timeout=5)
            await a.ask(Note(n=7), timeout=5)  # handled once the second restart is done
            await system.stop(b)
            b.tell_nowait(Note(n=1))
            stats = system.statistics()
    # a (restarted twice, each restart stopping and re-spawning its child c1) and c1 remain.
    assert stats.actors == 2
    assert stats.spawned == 5
    # Boom crashed a twice (delivery and redelivery): two failures, two restarts.
    assert (stats.failures, stats.restarts) == (2, 2)
    # Boom after its second crash, and the tell to the stopped b.
    assert stats.dead_letters == 2
    # "once" fired at 5 s; "never" was cancelled when b stopped.
    assert (stats.timers, stats.timers_fired) == (0, 1)
    restart = ["stop /a/c1", "stop /a"]
    assert log == [100, *restart, *restart, 7, "stop /b", *restart]
