"""Supervision: the policy table, restart with backoff, the restart budget and escalation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime import (
    Actor,
    ConfigurationError,
    EscalatedFailure,
    Message,
    MessageFailedError,
    Supervision,
    Terminated,
    VirtualClock,
    open_system,
)
from runtime._supervision import RestartBudget

QUICK = Supervision(backoff_min=0.0, backoff_max=0.0)


class Boom(Message, frozen=True, kw_only=True, tag="test.supervision.boom"):
    pass


class Get(Message, frozen=True, kw_only=True, tag="test.supervision.get"):
    pass


class Crashy(Actor[object]):
    """Crashes on every ``Boom``; ``Get`` returns how many messages this instance handled."""

    def __init__(self) -> None:
        self.handled = 0

    async def receive(self, message: object) -> Any:
        self.handled += 1
        if isinstance(message, Boom):
            raise RuntimeError("boom")
        return self.handled


# -- the policy, synchronously -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("backoff_min", "backoff_max", "restart", "expected"),
    [
        (0.1, 10.0, 1, 0.1),
        (0.1, 10.0, 2, 0.2),
        (0.1, 10.0, 3, 0.4),
        (1.0, 10.0, 4, 8.0),
        (1.0, 10.0, 5, 10.0),
        (1.0, 10.0, 50, 10.0),
        (0.0, 0.0, 3, 0.0),
        (2.0, 2.0, 7, 2.0),
    ],
)
def test_backoff_doubles_from_min_and_caps_at_max(
    backoff_min: float, backoff_max: float, restart: int, expected: float
) -> None:
    """Restart n waits backoff_min * 2**(n-1), capped at backoff_max."""
    policy = Supervision(backoff_min=backoff_min, backoff_max=backoff_max)
    assert policy.backoff(restart) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"max_restarts": -1}, "Supervision.max_restarts"),
        ({"within": 0.0}, "Supervision.within"),
        ({"backoff_min": -0.1}, "Supervision.backoff"),
        ({"backoff_min": 5.0, "backoff_max": 1.0}, "Supervision.backoff"),
    ],
)
def test_invalid_policies_are_rejected(options: dict[str, Any], where: str) -> None:
    """Negative budgets, empty windows and inverted backoffs raise ConfigurationError."""
    with pytest.raises(ConfigurationError) as info:
        Supervision(**options)
    assert info.value.where == where


def test_restart_budget_counts_failures_in_a_sliding_window() -> None:
    """Failures older than ``within`` seconds drop out of the count."""
    budget = RestartBudget(Supervision(max_restarts=2, within=10.0))
    assert [budget.record_failure(t) for t in (0.0, 1.0, 5.0, 10.5, 11.5, 30.0)] == [
        1,
        2,
        3,
        3,
        3,
        1,
    ]


@pytest.mark.parametrize(
    ("strategy", "failures", "allowed"),
    [
        ("restart", 1, True),
        ("restart", 3, True),
        ("restart", 4, False),
        ("stop", 1, False),
        ("escalate", 1, False),
    ],
)
def test_restart_budget_allows_restarts_up_to_max(
    strategy: Any, failures: int, allowed: bool
) -> None:
    """Only the restart strategy restarts, and only up to max_restarts failures in the window."""
    budget = RestartBudget(Supervision(strategy=strategy, max_restarts=3))
    assert budget.allows_restart(failures) is allowed


# -- restarts ----------------------------------------------------------------------------------


async def test_restart_backoff_is_exponential_on_the_virtual_clock() -> None:
    """Restarts happen exactly backoff_min, 2x, 4x ... capped at backoff_max after each failure."""
    clock = VirtualClock(auto_advance=True)
    starts = Starts()

    class Timed(Crashy):
        async def on_start(self) -> None:
            starts.record(clock.monotonic())

    policy = Supervision(max_restarts=6, within=1000.0, backoff_min=1.0, backoff_max=5.0)
    async with open_system(clock=clock) as system:
        ref = await system.spawn(Timed, supervision=policy)
        with anyio.fail_after(5):
            # Each Boom crashes twice (delivery and redelivery): two restarts per Boom.
            for expected_starts in (3, 5, 7):
                ref.tell_nowait(Boom())
                await starts.wait_for(expected_starts)
                assert await ref.ask(Get(), timeout=5) == 1
        stats = system.statistics()
    # Failure n at time t restarts at t + min(5, 1 * 2**(n-1)).
    assert starts.times == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0, 22.0]
    assert (stats.failures, stats.restarts, stats.dead_letters) == (6, 6, 3)


async def test_restarted_actor_is_a_fresh_instance_from_the_factory() -> None:
    """After a crash the actor is rebuilt by its factory: state starts over, on_stop ran once."""
    built: list[Crashy] = []
    stopped: list[int] = []

    class Tracked(Crashy):
        def __init__(self) -> None:
            super().__init__()
            built.append(self)

        async def on_stop(self) -> None:
            stopped.append(built.index(self))

    async with open_system(default_supervision=QUICK) as system:
        ref = await system.spawn(Tracked)
        with anyio.fail_after(5):
            assert await ref.ask(Get(), timeout=5) == 1
            assert await ref.ask(Get(), timeout=5) == 2
            with pytest.raises(MessageFailedError):
                await ref.ask(Boom(), timeout=5)
            assert await ref.ask(Get(), timeout=5) == 1
    assert len(built) == 3
    assert len({id(actor) for actor in built}) == 3
    assert stopped == [0, 1, 2]


async def test_failures_outside_the_window_do_not_use_up_the_budget() -> None:
    """With one restart allowed per 10 s, a failure every 20 s restarts every time."""
    clock = VirtualClock()
    policy = Supervision(max_restarts=1, within=10.0, backoff_min=0.0, backoff_max=0.0)
    async with open_system(clock=clock) as system:
        ref = await system.spawn(FlakyOnce, supervision=policy)
        with anyio.fail_after(5):
            for n in range(4):
                assert await ref.ask(Flaky(n=n), timeout=5) == n
                await clock.advance(20.0)
        stats = system.statistics()
        assert ref.is_alive
    assert (stats.failures, stats.restarts, stats.dead_letters) == (4, 4, 0)


async def test_budget_exhausted_within_the_window_escalates() -> None:
    """Two failures within the window with one restart allowed escalate (top level: raise)."""
    clock = VirtualClock()
    policy = Supervision(max_restarts=1, within=10.0, backoff_min=0.0, backoff_max=0.0)
    with pytest.raises(EscalatedFailure) as info:  # noqa: PT012
        async with open_system(clock=clock) as system:
            ref = await system.spawn(FlakyOnce, supervision=policy, name="flaky")
            with anyio.fail_after(5):
                assert await ref.ask(Flaky(n=1), timeout=5) == 1
                await clock.advance(9.0)
                ref.tell_nowait(Flaky(n=2))
                await anyio.sleep_forever()  # until the escalation cancels the body
    assert info.value.actor == "/flaky"
    assert isinstance(info.value.__cause__, RuntimeError)
    stats = system.statistics()
    assert (stats.failures, stats.restarts, stats.actors) == (2, 1, 0)
    assert [d.message for d in system.recent_dead_letters] == [Flaky(n=2)]


# -- escalation and strategies -------------------------------------------------------------------


async def test_top_level_actor_beyond_budget_makes_open_system_raise() -> None:
    """A top-level actor that exhausts its budget makes open_system raise EscalatedFailure."""
    policy = Supervision(max_restarts=1, backoff_min=0.0, backoff_max=0.0)
    with pytest.raises(EscalatedFailure) as info:  # noqa: PT012
        async with open_system(default_supervision=policy) as system:
            ref = await system.spawn(Crashy, name="top")
            ref.tell_nowait(Boom())
            with anyio.fail_after(5):
                await anyio.sleep_forever()  # until the escalation cancels the body
    assert info.value.actor == "/top"
    assert isinstance(info.value.__cause__, RuntimeError)
    assert system.root_failure is info.value
    stats = system.statistics()
    assert (stats.failures, stats.restarts, stats.dead_letters, stats.actors) == (2, 1, 1, 0)


async def test_child_beyond_budget_escalates_and_the_parent_is_restarted() -> None:
    """A child past its budget stops and fails its parent, which its own policy restarts."""
    parents: list[Parent] = []
    seen: list[Terminated] = []

    class Parent(Actor[object]):
        def __init__(self) -> None:
            parents.append(self)

        async def receive(self, message: object) -> Any:
            if isinstance(message, Terminated):
                seen.append(message)
                return None
            child = await self.context.spawn(
                Crashy, name="child", supervision=Supervision(max_restarts=0)
            )
            self.context.watch(child)
            return child

    async with open_system(default_supervision=QUICK) as system:
        parent = await system.spawn(Parent, name="parent")
        with anyio.fail_after(5):
            child = await parent.ask(Get(), timeout=5)
            child.tell_nowait(Boom())
            while not seen:
                await anyio.wait_all_tasks_blocked()
            assert not child.is_alive
            assert len(parents) == 2
            # The fresh parent can create the child again.
            again = await parent.ask(Get(), timeout=5)
            assert again.is_alive
            assert again != child
            assert system.lookup("/parent/child") == again
            stats = system.statistics()
            assert [d.message for d in system.recent_dead_letters] == [Boom()]
    assert seen == [Terminated(actor="/parent/child", reason="failed: RuntimeError('boom')")]
    assert (stats.failures, stats.restarts, stats.dead_letters) == (2, 1, 1)


async def test_escalation_chain_reaches_open_system() -> None:
    """Child escalates to a parent that may not restart: open_system raises with the chain."""

    class Parent(Actor[object]):
        async def receive(self, message: object) -> Any:
            return await self.context.spawn(
                Crashy, name="child", supervision=Supervision(max_restarts=0)
            )

    with pytest.raises(EscalatedFailure) as info:  # noqa: PT012
        async with open_system() as system:
            parent = await system.spawn(
                Parent, name="parent", supervision=Supervision(max_restarts=0)
            )
            with anyio.fail_after(5):
                child = await parent.ask(Get(), timeout=5)
                child.tell_nowait(Boom())
                await anyio.sleep_forever()  # until the escalation cancels the body
    assert info.value.actor == "/parent"
    middle = info.value.__cause__
    assert isinstance(middle, EscalatedFailure)
    assert middle.actor == "/parent"
    assert "/parent/child" in str(middle)
    assert isinstance(middle.__cause__, RuntimeError)
    assert system.statistics().actors == 0


async def test_stop_strategy_stops_without_escalating() -> None:
    """Strategy "stop": the failing actor stops (watchers told why); its parent is untouched."""
    parents: list[object] = []
    seen: list[Terminated] = []
    got = anyio.Event()

    class Parent(Actor[object]):
        def __init__(self) -> None:
            parents.append(self)

        async def receive(self, message: object) -> Any:
            if isinstance(message, Terminated):
                seen.append(message)
                got.set()
                return None
            child = await self.context.spawn(
                Crashy, name="child", supervision=Supervision(strategy="stop")
            )
            self.context.watch(child)
            return child

    async with open_system(default_supervision=QUICK) as system:
        parent = await system.spawn(Parent, name="parent")
        with anyio.fail_after(5):
            child = await parent.ask(Get(), timeout=5)
            child.tell_nowait(Boom())
            await got.wait()
            assert system.lookup("/parent/child") is None
            assert parent.is_alive
        stats = system.statistics()
    assert len(parents) == 1
    assert seen == [Terminated(actor="/parent/child", reason="failed: RuntimeError('boom')")]
    assert (stats.failures, stats.restarts, stats.dead_letters) == (1, 0, 1)


async def test_escalate_strategy_hands_the_first_failure_to_the_parent() -> None:
    """Strategy "escalate": the first failure stops the child and fails the parent."""
    parents: list[object] = []

    class Parent(Actor[object]):
        def __init__(self) -> None:
            parents.append(self)

        async def receive(self, message: object) -> Any:
            return await self.context.spawn(
                Crashy, name="child", supervision=Supervision(strategy="escalate")
            )

    async with open_system(default_supervision=QUICK) as system:
        parent = await system.spawn(Parent)
        with anyio.fail_after(5):
            child = await parent.ask(Get(), timeout=5)
            child.tell_nowait(Boom())
            while len(parents) < 2:
                await anyio.wait_all_tasks_blocked()
            assert not child.is_alive
        stats = system.statistics()
    assert (stats.failures, stats.restarts, stats.dead_letters) == (2, 1, 1)


async def test_restart_that_cannot_start_gives_up_without_redelivering() -> None:
    """If the restarted instance's on_start fails past the budget, the message is dead-lettered."""
    built: list[int] = []
    delivered: list[int] = []

    class Fragile(Actor[object]):
        def __init__(self) -> None:
            self.number = len(built)
            built.append(self.number)

        async def on_start(self) -> None:
            if self.number > 0:
                raise OSError("cannot reconnect")

        async def receive(self, message: object) -> Any:
            delivered.append(self.number)
            raise RuntimeError("boom")

    policy = Supervision(max_restarts=1, backoff_min=0.0, backoff_max=0.0)
    with pytest.raises(EscalatedFailure) as info:  # noqa: PT012
        async with open_system(default_supervision=policy) as system:
            ref = await system.spawn(Fragile, name="fragile")
            ref.tell_nowait(Boom())
            with anyio.fail_after(5):
                await anyio.sleep_forever()  # until the escalation cancels the body
    assert isinstance(info.value.__cause__, OSError)
    assert built == [0, 1]
    assert delivered == [0]
    stats = system.statistics()
    assert (stats.failures, stats.dead_letters) == (2, 1)
    assert [d.message for d in system.recent_dead_letters] == [Boom()]


# -- helpers -----------------------------------------------------------------------------------


class Flaky(Message, frozen=True, kw_only=True, tag="test.supervision.flaky"):
    n: int


class FlakyOnce(Actor[object]):
    """Crashes on the first delivery of each ``Flaky(n)``; the redelivery returns ``n``."""

    crashed: set[int] = set()

    async def receive(self, message: object) -> Any:
        assert isinstance(message, Flaky)
        if message.n not in FlakyOnce.crashed:
            FlakyOnce.crashed.add(message.n)
            raise RuntimeError(f"flaky {message.n}")
        return message.n


@pytest.fixture(autouse=True)
def _reset_flaky() -> None:
    FlakyOnce.crashed.clear()


class Starts:
    """Start times recorded by on_start, with a way to wait for the n-th."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._changed = anyio.Event()

    def record(self, now: float) -> None:
        self.times.append(now)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.times) < count:
            await self._changed.wait()
