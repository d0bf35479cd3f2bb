"""Operator verbs in the engine: pause (checkpoint, finish, kill), resume, amend, retry,
checkpoint, preempt, and node drain, sleep, resume and release -- each one journaled."""

from __future__ import annotations

from datetime import timedelta

import anyio
import pytest
from engine_farm import CPU4, ONE, WAIT, job, open_farm

from actors import (
    ENGINE_CODEC,
    EngineSettings,
    JobAmended,
    JobPaused,
    JobReopened,
    JobResumed,
    NodeHealthChanged,
    Priority,
    RetryPolicy,
    TaskCheckpointRequested,
    TaskPreempted,
    TaskRequeued,
    Timeouts,
    open_engine,
)
from persistence import InMemoryJournal
from runtime import ConfigurationError, VirtualClock


async def test_pause_kill_requeues_without_spending_an_attempt_and_resume_runs_it() -> None:
    """A killed attempt is requeued (no attempt spent), nothing starts while paused, and
    resume runs the task again; both verbs are journaled."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "g", retries=RetryPolicy(max_attempts=1))])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        summary = await farm.engine.pause("a", mode="kill")
        assert summary.status == "paused"
        await farm.wait_for_event("a", TaskRequeued)
        assert "the job is paused" in await farm.engine.why("a")
        assert len(farm.works.of("a")) == 1
        await farm.engine.resume("a")
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 2)
        farm.works.open("g")
        assert (await farm.wait("a")).status == "completed"
        kinds = {type(e) for e in await farm.events("a")}
        assert {JobPaused, JobResumed} <= kinds


async def test_pause_finish_lets_running_work_finish_and_starts_nothing_new() -> None:
    """mode finish: the running task completes, the queued one waits for resume."""
    async with open_farm({"n1": ONE}) as farm:
        await farm.engine.submit([job("a", "block", "g", tasks=2)])
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 1)
        await farm.engine.pause("a", mode="finish")
        farm.works.open("g")
        await farm.wait_for_event("a", JobPaused)
        with anyio.fail_after(WAIT):
            while "task(s) 1: the job is paused" not in await farm.engine.why("a"):
                await anyio.lowlevel.checkpoint()
        assert len(farm.works.of("a")) == 1
        await farm.engine.resume("a")
        assert (await farm.wait("a")).status == "completed"


async def test_amend_priority_reorders_the_queue_within_one_cycle() -> None:
    """Raising a queued job's priority puts it ahead; the change is journaled readably."""
    async with open_farm({"n1": ONE}) as farm:
        await farm.engine.submit([job("busy", "block", "g")])
        await farm.works.wait_until(lambda: bool(farm.works.of("busy")))
        await farm.engine.submit([job("first", priority=Priority.LOW)])
        await farm.engine.submit([job("second", priority=Priority.LOW)])
        await farm.engine.amend("second", priority="critical", set_metadata={"deadline": "soon"})
        farm.works.open("g")
        await farm.wait("first")
        await farm.wait("second")
        assert farm.works.of("second")[0].at <= farm.works.of("first")[0].at
        [amended] = [e for e in await farm.events("second") if isinstance(e, JobAmended)]
        assert amended.changes == ("priority: low -> critical", 'deadline: null -> "soon"')
        with pytest.raises(ConfigurationError, match="unknown priority 'urgent'"):
            await farm.engine.amend("first", priority="urgent")


async def test_retry_reopens_a_failed_job_with_fresh_attempts() -> None:
    """A failed job's tasks run again after ``retry`` (by task name), and it completes."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "flaky", "1", retries=RetryPolicy(max_attempts=1))])
        assert (await farm.wait("a")).status == "failed"
        assert await farm.engine.retry("a", ["0"]) == [0]
        assert (await farm.wait("a")).status == "completed"
        assert any(isinstance(e, JobReopened) for e in await farm.events("a"))
        with pytest.raises(ConfigurationError, match="has no task 'nope'"):
            await farm.engine.retry("a", ["nope"])


async def test_checkpoint_and_preempt_reach_the_running_attempt() -> None:
    """checkpoint asks for a checkpoint (the work writes one); preempt yields the attempt,
    which is requeued and resumes from that checkpoint."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "checkpoint_on_request", checkpointable=True)])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        assert await farm.engine.checkpoint("a", 0)
        await farm.wait_for_event("a", TaskCheckpointRequested)
        await farm.works.wait_until(lambda: farm.works.checkpoints.get("a", 0) >= 1)
        assert await farm.engine.preempt("a", "0")
        await farm.wait_for_event("a", TaskPreempted)
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 2)
        assert farm.works.of("a")[1].resume_from == "checkpoint-2"  # taken when it yielded


async def test_a_planned_drain_keeps_long_work_off_and_yields_what_runs_at_its_time() -> None:
    """drain --at T: a task whose max_runtime would cross T is not placed there; at T the
    node drains and the attempt still running (no stated walltime) yields (requeued)."""
    clock = VirtualClock()  # moved by hand: the test looks at the farm before the drain
    async with open_farm({"n1": CPU4}, clock=clock) as farm:
        at = clock.now() + timedelta(hours=1)
        await farm.engine.set_node_health("n1", "draining", reason="kernel update", at=at)
        short = job("short", "sleep", "86400")
        long = job("long", timeouts=Timeouts(max_runtime=7200))
        await farm.engine.submit([short, long])
        await clock.advance(1)
        assert [r.job for r in farm.works.runs] == ["short"]
        assert "drains before it could finish" in await farm.engine.why("long")
        await clock.advance(3600)
        await farm.wait_for_event("short", TaskPreempted)
        [node] = await farm.engine.nodes()
        assert node.health == "draining"
        events = [r.event for r in await farm.journal.read_stream("node:n1")]
        assert [e.health for e in events if isinstance(e, NodeHealthChanged)] == [
            "online",
            "draining",
        ]


async def test_health_changes_survive_a_rejoin_and_a_restart() -> None:
    """Drain and sleep are journaled: a node that rejoins, or a restarted engine, keeps them."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with open_farm({"n1": CPU4, "n2": CPU4}, clock=clock, journal=journal) as farm:
        await farm.engine.set_node_health("n1", "draining", reason="disk swap")
        await farm.engine.set_node_health("n2", "sleeping", reason="energy")
        await farm.engine.remove_node("n1", reason="agent restarted")
        await farm.add_node("n1")
        health = {n.name: n.health for n in await farm.engine.nodes()}
        assert health == {"n1": "draining", "n2": "sleeping"}
    async with open_farm({"n1": CPU4, "n2": CPU4}, clock=clock, journal=journal) as farm:
        nodes = {n.name: n for n in await farm.engine.nodes()}
        assert nodes["n1"].health == "draining"
        assert nodes["n1"].reason == "disk swap"
        assert nodes["n2"].health == "sleeping"


async def test_a_sleeping_node_that_goes_offline_loses_nothing() -> None:
    """An attempt on a node put to sleep stays its own when the node disconnects (it is not
    requeued); when the node comes back its agent can re-claim it."""
    async with open_farm({"n1": CPU4, "n2": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "g", resources=CPU4)])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        [run] = farm.works.of("a")
        await farm.engine.set_node_health(run.node, "sleeping", reason="night")
        await farm.engine.remove_node(run.node, reason="suspended")
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert len(farm.works.of("a")) == 1
        assert not any(isinstance(e, TaskRequeued) for e in await farm.events("a"))


async def test_removing_or_draining_an_unknown_node_is_refused() -> None:
    """remove_node and set_node_health name a node the engine never saw."""
    clock = VirtualClock(auto_advance=True)
    async with open_engine(
        journal=InMemoryJournal(clock=clock, codec=ENGINE_CODEC),
        clock=clock,
        settings=EngineSettings(),
    ) as engine:
        with pytest.raises(ConfigurationError, match="no node named 'ghost'"):
            await engine.remove_node("ghost", reason="?")
        with pytest.raises(ConfigurationError, match="no node named 'ghost'"):
            await engine.set_node_health("ghost", "draining")


@pytest.mark.parametrize(
    ("tag", "payload"),
    [
        ("engine.job_paused", '{"mode": "checkpoint", "reason": "paused by operator"}'),
        ("engine.job_resumed", '{"reason": "resumed by operator"}'),
        ("engine.job_amended", '{"priority": "high", "changes": ["priority: normal -> high"]}'),
        ("engine.job_reopened", '{"tasks": [0], "reason": "retried by operator"}'),
        ("engine.task_released", '{"task": 0}'),
        ("engine.task_checkpoint_requested", '{"task": 0, "token": 3, "reason": "operator"}'),
        ("engine.task_preempted", '{"task": 0, "token": 3, "node": "n1", "reason": "r"}'),
        ("engine.job_cancel_requested", '{"reason": "cancelled by user"}'),
    ],
)
def test_a_verb_journaled_before_it_named_who_asked_still_decodes(tag: str, payload: str) -> None:
    """An operator verb's event written before ``by`` existed decodes, naming no one."""
    event = ENGINE_CODEC.decode(tag, 1, payload)
    assert event.by is None  # type: ignore[attr-defined]


def test_a_node_health_change_journaled_before_it_named_the_operator_still_decodes() -> None:
    """A health change written before ``operator`` existed decodes, with its kind of decider."""
    event = ENGINE_CODEC.decode(
        "engine.node_health_changed", 1, '{"health": "draining", "by": "operator"}'
    )
    assert isinstance(event, NodeHealthChanged)
    assert (event.by, event.operator) == ("operator", None)


async def test_an_embedded_verb_names_no_one_and_keeps_the_operator_wording() -> None:
    """An embedding application's verbs (no ``by``) journal the reasons they always had."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "g")])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        await farm.engine.pause("a", mode="finish")
        await farm.wait_for_event("a", JobPaused)
        [paused] = [e for e in await farm.events("a") if isinstance(e, JobPaused)]
        assert (paused.reason, paused.by) == ("paused by operator", None)
        cancelled = await farm.engine.cancel("a")
        assert cancelled.reason == "cancelled by user"
