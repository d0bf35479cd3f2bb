"""Failures as a farm sees them: lost attempts are requeued for free, blocklists count failures
per node, the job's own faults never count against a node, quarantine needs several jobs, and
a command the job actor cannot process fails its task visibly instead of wedging it."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from engine_farm import CPU4, WAIT, job, open_farm

from actors import (
    AttemptProgress,
    EngineSettings,
    NodeBlocklisted,
    RetryPolicy,
    TaskFailed,
    TaskRequeued,
    TaskSpec,
)
from actors.engine._messages import ReportAttempt


async def test_a_lost_attempt_is_requeued_without_spending_a_retry() -> None:
    """An agent that restarted reports its attempt lost: requeued at once, no attempt spent,
    nothing counted against the node (even with max_attempts = 1)."""
    async with open_farm({"n1": CPU4}) as farm:
        farm.works.lose["a"] = 2
        await farm.engine.submit([job("a", retries=RetryPolicy(max_attempts=1))])
        summary = await farm.wait("a")
        assert summary.status == "completed"
        assert len(farm.works.of("a")) == 3
        events = await farm.events("a")
        lost = [e for e in events if isinstance(e, TaskRequeued)]
        assert [e.lost for e in lost] == [True, True]
        assert not any(isinstance(e, TaskFailed | NodeBlocklisted) for e in events)
        [node] = await farm.engine.nodes()
        assert node.health == "online"
        assert node.consecutive_failures == 0


async def test_a_task_that_keeps_losing_its_host_ends_with_that_reason() -> None:
    """max_lost (3 by default) caps the free requeues: the task fails naming why."""
    async with open_farm({"n1": CPU4}) as farm:
        farm.works.lose["a"] = 99
        await farm.engine.submit([job("a")])
        summary = await farm.wait("a")
        assert summary.status == "failed"
        assert summary.reason is not None
        assert "lost its host 3 times" in summary.reason
        assert len(farm.works.of("a")) == 3


async def test_a_node_removed_three_times_under_a_task_ends_it_as_lost() -> None:
    """Losing the node (not the task's fault) is a requeue; the cap still applies."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "never", retries=RetryPolicy(max_attempts=1))])
        for round_ in range(3):
            await farm.works.wait_until(lambda r=round_: len(farm.works.of("a")) == r + 1)  # type: ignore[misc]
            await farm.engine.remove_node("n1", reason="unplugged")
            if round_ < 2:
                await farm.add_node("n1")
        summary = await farm.wait("a")
        assert summary.status == "failed"
        assert summary.reason is not None
        assert "lost its host 3 times" in summary.reason


@pytest.mark.parametrize(
    ("failing_nodes", "blocklisted"),
    [
        (["n1"], []),  # one failure on a node does not blocklist it (blocklist_after = 2)
        (["n1", "n1"], ["n1"]),  # two failures of this job on n1 do
        (["n1", "n2", "n1"], ["n1"]),  # spread out: n1 still reaches two
        (["n1", "n2", "n3"], []),  # one each: nobody is blocklisted
    ],
)
async def test_the_blocklist_counts_this_jobs_failures_per_node(
    failing_nodes: list[str], blocklisted: list[str]
) -> None:
    """A job blocklists a node after ``blocklist_after`` of its failures there, counted per
    node in the job's state -- not by whichever task last ran there."""
    settings = EngineSettings(blocklist_after=2, blocklist_for=60)
    async with open_farm({}, settings=settings) as farm:
        for name in ("n1", "n2", "n3"):
            await farm.engine.add_node(
                name, CPU4, executor=farm.executor_for(name), labels=[f"host={name}"]
            )
        # Task i is pinned to failing_nodes[i] and fails its first attempt there.
        spec = job("j", "flaky", "1", retries=RetryPolicy(max_attempts=2, backoff=0))
        spec = msgspec.structs.replace(
            spec,
            tasks=tuple(
                TaskSpec(index=i, name=str(i), requires=(f"host={node}",))
                for i, node in enumerate(failing_nodes)
            ),
        )
        await farm.engine.submit([spec])
        assert (await farm.wait("j")).status == "completed"
        events = await farm.events("j")
    assert sorted(e.node for e in events if isinstance(e, NodeBlocklisted)) == blocklisted


async def test_a_command_that_cannot_start_never_counts_against_the_node() -> None:
    """Two jobs whose command does not exist fail, and the node stays online (not the node's
    fault); failures of several different jobs are what quarantine a node."""
    settings = EngineSettings(quarantine_after=2, quarantine_distinct_jobs=2, blocklist_after=10)
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        for name in ("typo-1", "typo-2", "typo-3"):
            await farm.engine.submit([job(name, "no_such_function")])
            assert (await farm.wait(name)).status == "failed"
        [node] = await farm.engine.nodes()
        assert node.health == "online"
        events = await farm.events("typo-1")
        [failed] = [e for e in events if isinstance(e, TaskFailed)]
        assert failed.kind == "start"
        assert failed.job_fault


async def test_the_same_failure_of_one_job_on_two_nodes_is_the_jobs_fault() -> None:
    """A job failing the same way on two nodes is not the nodes' fault: neither node has
    failures counted against it afterwards."""
    settings = EngineSettings(quarantine_after=2, quarantine_distinct_jobs=1, blocklist_after=1)
    async with open_farm({"n1": CPU4, "n2": CPU4}, settings=settings) as farm:
        await farm.engine.submit(
            [job("bad", "fail", retries=RetryPolicy(max_attempts=2, backoff=0))]
        )
        assert (await farm.wait("bad")).status == "failed"
        nodes = await farm.engine.nodes()
        assert [n.health for n in nodes] == ["online", "online"]
        assert [n.consecutive_failures for n in nodes] == [0, 0]
        failed = [e for e in await farm.events("bad") if isinstance(e, TaskFailed)]
        assert [e.job_fault for e in failed] == [False, True]


async def test_failures_from_several_jobs_quarantine_a_node() -> None:
    """Three failed attempts in a row on n1, from three jobs, quarantine it."""
    settings = EngineSettings(quarantine_after=3, quarantine_distinct_jobs=2, blocklist_after=10)
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        for name in ("a", "b", "c"):
            await farm.engine.submit([job(name, "fail_on", "n1")])
            await farm.wait(name)
        [node] = await farm.engine.nodes()
        assert node.health == "quarantined"
        assert "3 failed attempts in a row from 3 jobs" in node.reason


async def test_a_poison_report_fails_its_task_visibly_instead_of_wedging_it() -> None:
    """A report that slipped past validation and crashes the job actor (progress NaN) ends its
    task as failed with the error, the attempt is stopped, and the farm goes on."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "never")])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        [run] = farm.works.of("a")
        ref = farm.engine.job_ref("a")
        assert ref is not None
        # msgspec validates on decoding, not on construction: this is what a buggy sender
        # could hand the job actor.
        poison = AttemptProgress(
            job_id="a",
            task_id="0",
            attempt=run.attempt,
            fencing_token=run.token,
            fraction=float("nan"),
        )
        with anyio.fail_after(WAIT):
            assert await ref.ask(ReportAttempt(report=poison, node="n1"), timeout=WAIT)
        summary = await farm.wait("a")
        assert summary.status == "failed"
        assert summary.reason is not None
        assert "internal error while handling ReportAttempt" in summary.reason
        await farm.works.wait_until(lambda: run in farm.works.cancelled)
        await farm.engine.submit([job("b")])
        assert (await farm.wait("b")).status == "completed"
