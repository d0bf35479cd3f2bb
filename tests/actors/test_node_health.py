"""Node health set from outside the policy: a drained node gets no new work until resumed."""

from __future__ import annotations

import anyio
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    Resources,
    SubmitJob,
    TaskSpec,
    open_engine,
    open_inprocess_executor,
)
from persistence import InMemoryJournal
from runtime import ConfigurationError, VirtualClock

CPU = Resources.of(cores=2, memory="4GiB")
ONE = Resources.of(cores=1, memory="1GiB")


def _job(job_id: str, tasks: int) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=("inprocess:work",),
        resources=ONE,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
    )


async def test_draining_node_gets_no_new_work_until_it_is_online_again() -> None:
    """While its only node drains, a job waits (and says why); once resumed, it runs."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    ran: list[str] = []

    async def work(ctx: AttemptContext) -> None:
        ran.append(f"{ctx.spec.job_id}/{ctx.spec.task_id}")

    async with (
        open_inprocess_executor({"work": work}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", CPU, executor=executor)
        await engine.set_node_health("n1", "draining", reason="maintenance at 02:00")
        [job_id] = await engine.submit([_job("waits", 2)])
        with anyio.fail_after(5):
            while "no node is online" not in await engine.why(job_id):
                await anyio.lowlevel.checkpoint()
        assert ran == []
        assert [n.health for n in await engine.nodes()] == ["draining"]
        await engine.set_node_health("n1", "online")
        with anyio.fail_after(5):
            summary = await engine.wait_job(job_id)
    assert summary.status == "completed"
    assert sorted(ran) == ["waits/0", "waits/1"]


async def test_unknown_health_or_node_is_refused() -> None:
    """A health the engine does not know, or a node it has never seen, is a clear error."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with open_engine(journal=journal, clock=clock) as engine:
        with pytest.raises(ConfigurationError, match="unknown health 'asleep'"):
            await engine.set_node_health("n1", "asleep")
        with pytest.raises(ConfigurationError, match="no node named 'ghost'"):
            await engine.set_node_health("ghost", "draining")


async def test_releasing_a_quarantined_node_is_journaled_and_survives_a_restart() -> None:
    """Quarantine and its release are journaled, so a restarted engine remembers the release."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)

    async def work(ctx: AttemptContext) -> None:
        return None

    async with (
        open_inprocess_executor({"work": work}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", CPU, executor=executor)
        await engine.set_node_health("n1", "quarantined", reason="bad disk")
        assert [n.health for n in await engine.nodes()] == ["quarantined"]
    async with open_engine(journal=journal, clock=clock) as engine:
        assert [n.health for n in await engine.nodes()] == ["quarantined"]
        await engine.set_node_health("n1", "online", reason="disk replaced")
    async with open_engine(journal=journal, clock=clock) as engine:
        # Not connected after a restart (offline), but no longer quarantined.
        assert [n.health for n in await engine.nodes()] == ["offline"]
