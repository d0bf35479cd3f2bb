"""A simulated render farm: the production engine and a policy on a virtual clock.

Every node gets a simulated executor whose attempts last ``duration(node, spec)`` seconds of the
clock (a trace, a node-by-job-type speed matrix), so a week runs in seconds with the same engine,
policy and journal code as a real farm.  It models what hardware does around the engine:

- **sleep and wake**: a node the policy puts to sleep disconnects (its agent is suspended); a
  node it wakes reconnects ``wake_seconds`` later (booting, recorded in ``boots``), as with
  wake-on-LAN -- unless it lost power meanwhile;
- **node failures**: ``fail_node`` takes a node away (its work is requeued from the last
  checkpoint), ``restore_node`` brings it back;
- **checkpoints**: a preempted or lost attempt resumes with the fraction of its work it had done
  (the simulated executor checkpoints its elapsed time; the fraction carries to another node).

Everything the engine decides is in ``journal`` (an in-memory journal with the engine's and the
render farm's events), for the benchmark's figures and for ``audit``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import anyio
from anyio.abc import TaskGroup

from actors import (
    ENGINE_CODEC,
    AttemptOutcome,
    AttemptSpec,
    Engine,
    EngineSettings,
    NodeHealthChanged,
    Policy,
    SimulatedExecutor,
    open_engine,
    open_simulated_executor,
)
from persistence import AppendResult, Event, EventCodec, InMemoryJournal
from runtime import Clock, VirtualClock

from ._events import RENDER_CODEC
from ._models import RenderNode

__all__ = ["SimulatedFarm", "farm_codec", "open_simulated_farm"]

Duration = Callable[[str, AttemptSpec], float]


def farm_codec() -> EventCodec:
    """Return a codec of the engine's and the render farm's events."""
    codec = EventCodec()
    codec.update(ENGINE_CODEC)
    codec.update(RENDER_CODEC)
    return codec


class _WatchedJournal(InMemoryJournal):
    """An in-memory journal that tells the farm when a node's health was changed."""

    def __init__(self, *, clock: Clock, codec: EventCodec) -> None:
        super().__init__(clock=clock, codec=codec)
        self.on_health: Callable[[str, NodeHealthChanged], None] | None = None

    async def append(
        self,
        stream_id: str,
        events: Sequence[Event],
        *,
        expected_version: int | None = None,
        correlation_id: str | None = None,
    ) -> AppendResult:
        result = await super().append(
            stream_id, events, expected_version=expected_version, correlation_id=correlation_id
        )
        if self.on_health is not None and stream_id.startswith("node:"):
            for event in events:
                if isinstance(event, NodeHealthChanged):
                    self.on_health(stream_id[5:], event)
        return result


@dataclass
class _Attempt:
    seconds: float  # planned duration of the whole task on its node
    started: float  # clock.monotonic() at start


def _bind(
    outcome: Callable[[str, AttemptSpec], AttemptOutcome], node: str
) -> Callable[[AttemptSpec], AttemptOutcome]:
    return lambda spec: outcome(node, spec)


class _Timings:
    """Durations of attempts: the trace's, less what a resumed attempt had done."""

    def __init__(self, *, clock: VirtualClock, duration: Duration) -> None:
        self.clock = clock
        self.duration = duration
        self.attempts: dict[tuple[str, str], _Attempt] = {}

    def of(self, node: str) -> Callable[[AttemptSpec], float]:
        def seconds(spec: AttemptSpec) -> float:
            full = max(0.0, float(self.duration(node, spec)))
            key = (spec.job_id, spec.task_id)
            done = 0.0
            previous = self.attempts.get(key)
            if spec.resume_from and spec.resume_from.startswith("sim:") and previous is not None:
                elapsed = float(spec.resume_from[4:])
                done = min(1.0, elapsed / previous.seconds) if previous.seconds else 1.0
            self.attempts[key] = _Attempt(seconds=full, started=self.clock.monotonic())
            return full * (1.0 - done)

        return seconds


@dataclass
class SimulatedFarm:
    """A running simulated farm; see the module docstring."""

    engine: Engine
    journal: InMemoryJournal
    clock: VirtualClock
    nodes: dict[str, RenderNode]
    wake_seconds: float
    _group: TaskGroup
    _executors: dict[str, SimulatedExecutor]
    down: dict[str, list[tuple[datetime, datetime | None]]] = field(default_factory=dict)
    boots: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)

    async def _join(self, name: str) -> None:
        node = self.nodes[name]
        executor = self._executors[name]
        await self.engine.add_node(
            node.name, node.capacity, executor=executor, labels=node.all_labels
        )

    async def fail_node(self, name: str, *, reason: str = "power failure") -> None:
        """Take a node away as if it lost power (its attempts are requeued)."""
        self.down.setdefault(name, []).append((self.clock.now(), None))
        await self.engine.remove_node(name, reason=reason)

    async def restore_node(self, name: str) -> None:
        """Bring a failed node back."""
        spans = self.down.get(name)
        if spans and spans[-1][1] is None:
            spans[-1] = (spans[-1][0], self.clock.now())
        await self._join(name)

    def _health_changed(self, node: str, event: NodeHealthChanged) -> None:
        if event.by != "policy":
            return
        if event.health == "sleeping":
            self._group.start_soon(self._suspend, node)
        elif event.health == "online":
            self._group.start_soon(self._boot, node)

    async def _suspend(self, node: str) -> None:
        # Started from inside the scheduler: this task holds no unit of the clock's activity.
        self.clock.activity.exit()
        await self.engine.set_node_reachable(node, "offline")

    async def _boot(self, node: str) -> None:
        self.clock.activity.exit()
        woken = self.clock.now()
        await self.clock.sleep(self.wake_seconds)
        spans = self.down.get(node)
        if spans and spans[-1][1] is None:
            return  # it lost power while asleep: it never comes back by itself
        self.boots.setdefault(node, []).append((woken, self.clock.now()))
        await self.engine.set_node_reachable(node, "connected")


@asynccontextmanager
async def open_simulated_farm(
    *,
    policy: Policy,
    nodes: Sequence[RenderNode],
    duration: Duration,
    clock: VirtualClock | None = None,
    settings: EngineSettings | None = None,
    wake_seconds: float = 120.0,
    journal: InMemoryJournal | None = None,
    outcome: Callable[[str, AttemptSpec], AttemptOutcome] | None = None,
) -> AsyncIterator[SimulatedFarm]:
    """Open a simulated farm of ``nodes`` running ``policy``; see the module docstring.

    ``outcome(node, spec)`` decides how each attempt ends (default: completed)."""
    clock = clock or VirtualClock(auto_advance=True)
    watched = journal if journal is not None else _WatchedJournal(clock=clock, codec=farm_codec())
    async with AsyncExitStack() as stack:
        group = await stack.enter_async_context(anyio.create_task_group())
        # The executors outlive the engine, as node agents outlive their coordinator.
        executors: dict[str, SimulatedExecutor] = {}
        farm_nodes = {node.name: node for node in nodes}
        timings = _Timings(clock=clock, duration=duration)
        for node in nodes:
            executors[node.name] = await stack.enter_async_context(
                open_simulated_executor(
                    duration=timings.of(node.name),
                    outcome=_bind(outcome, node.name) if outcome is not None else None,
                    clock=clock,
                )
            )
        engine = await stack.enter_async_context(
            open_engine(journal=watched, clock=clock, policy=policy, settings=settings)
        )
        farm = SimulatedFarm(
            engine=engine,
            journal=watched,
            clock=clock,
            nodes=farm_nodes,
            wake_seconds=wake_seconds,
            _group=group,
            _executors=executors,
        )
        if isinstance(watched, _WatchedJournal):
            watched.on_health = farm._health_changed
        for node in nodes:
            await farm._join(node.name)
        try:
            yield farm
        finally:
            group.cancel_scope.cancel()
