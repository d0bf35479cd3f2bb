"""The engine end to end: submission, dependencies, retries, blocklists, stale reports, cancel,
checkpoints, ``why`` and batched commits, with in-process fakes on a virtual clock."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from engine_farm import (
    CPU4,
    NO_RETRY,
    ONE,
    WAIT,
    CountingJournal,
    job,
    open_farm,
)

from actors import (
    ENGINE_CODEC,
    AttemptFinished,
    AttemptProgress,
    Condition,
    Dependency,
    DependencyCycleError,
    ElementMap,
    Engine,
    EngineSettings,
    JobFinished,
    JobNotFoundError,
    JobSubmitted,
    NodeBlocklisted,
    NodeHealthChanged,
    Resources,
    RetryPolicy,
    SpecError,
    SubmitJob,
    TaskAssigned,
    TaskCancelled,
    TaskCheckpointed,
    TaskCompleted,
    TaskFailed,
    TaskRequeued,
    TaskSpec,
    TaskStarted,
    UnknownDependencyError,
    open_engine,
    open_subprocess_executor,
)
from actors.engine._messages import ReportAttempt
from actors.executors import AttemptIdentity
from persistence import Event, InMemoryJournal
from runtime import SystemClock, VirtualClock

GPU2 = Resources.of(cores=8, memory="32GiB", gpus=2, gpu_memory="16GiB")


def positions(events: Sequence[Event], kind: type[Event], task: int) -> list[int]:
    return [i for i, e in enumerate(events) if isinstance(e, kind) and e.task == task]  # type: ignore[attr-defined]


# -- the happy path -----------------------------------------------------------------------------


async def test_a_job_completes_passivates_and_journals_its_events_in_order() -> None:
    """Every task completes once, the job passivates and its status comes from the journal."""
    async with open_farm() as farm:
        assert await farm.engine.submit([job("a", tasks=3)]) == ["a"]
        summary = await farm.wait("a")
        assert summary.status == "completed"
        assert summary.task_counts == {"completed": 3}
        assert farm.engine.job_ref("a") is None  # passivated
        [from_journal] = await farm.engine.status("a", tasks=True)
        assert from_journal.status == "completed"
        assert [t.status for t in from_journal.tasks] == ["completed"] * 3
        events = await farm.events("a")
    assert isinstance(events[0], JobSubmitted)
    assert isinstance(events[-1], JobFinished)
    assert events[-1].outcome == "completed"
    for task in range(3):
        assigned = positions(events, TaskAssigned, task)
        started = positions(events, TaskStarted, task)
        completed = positions(events, TaskCompleted, task)
        assert len(assigned) == len(started) == len(completed) == 1
        assert assigned[0] < started[0] < completed[0]
    assert sorted(r.task for r in farm.works.runs) == [0, 1, 2]


async def test_status_without_a_job_lists_every_job_in_the_journal() -> None:
    """``status()`` reads live and passivated jobs alike, sorted by id."""
    async with open_farm() as farm:
        await farm.engine.submit([job("b"), job("a", "block", "gate")])
        await farm.wait("b")
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        summaries = await farm.engine.status()
        assert [(s.job_id, s.status) for s in summaries] == [("a", "active"), ("b", "completed")]
        farm.works.open("gate")
        assert (await farm.wait("a")).status == "completed"


# -- dependencies -------------------------------------------------------------------------------


async def test_a_dependant_starts_only_after_its_parent_completed() -> None:
    """B (on_success of A) is assigned only after A's JobFinished is journaled."""
    async with open_farm() as farm:
        await farm.engine.submit(
            [
                job("a", "block", "gate", tasks=2),
                job("b", tasks=2, dependencies=[Dependency(parent="a")]),
            ]
        )
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 2)
        assert "waits on a" in await farm.engine.why("b")
        assert not farm.works.of("b")
        farm.works.open("gate")
        assert (await farm.wait("b")).status == "completed"
        records = [r async for batch in farm.journal.read_all() for r in batch]
    a_done = next(
        r.position for r in records if r.stream_id == "job:a" and isinstance(r.event, JobFinished)
    )
    b_assigned = [
        r.position for r in records if r.stream_id == "job:b" and isinstance(r.event, TaskAssigned)
    ]
    assert len(b_assigned) == 2
    assert min(b_assigned) > a_done


async def test_element_wise_dependency_releases_task_i_after_parent_task_i() -> None:
    """Task i of B starts once task i of A completed, while A's other tasks still run."""
    async with open_farm() as farm:
        await farm.engine.submit(
            [
                job("a", "block", "a{task}", tasks=2),
                job(
                    "b",
                    tasks=2,
                    dependencies=[Dependency(parent="a", elementwise=ElementMap())],
                ),
            ]
        )
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 2)
        farm.works.open("a1")
        await farm.works.wait_until(lambda: bool(farm.works.of("b")))
        assert [r.task for r in farm.works.of("b")] == [1]
        assert "task(s) 0: waiting on" in await farm.engine.why("b")
        farm.works.open("a0")
        assert (await farm.wait("b")).status == "completed"
        records = [r async for batch in farm.journal.read_all() for r in batch]
    for task in (0, 1):
        parent_done = next(
            r.position
            for r in records
            if r.stream_id == "job:a"
            and isinstance(r.event, TaskCompleted)
            and r.event.task == task
        )
        child_assigned = next(
            r.position
            for r in records
            if r.stream_id == "job:b" and isinstance(r.event, TaskAssigned) and r.event.task == task
        )
        assert child_assigned > parent_done


async def test_a_failed_parent_cancels_its_dependant_and_runs_its_on_failure_dependant() -> None:
    """After A fails, B (on_success) is cancelled naming A, and C (on_failure) runs."""
    async with open_farm() as farm:
        await farm.engine.submit(
            [
                job("a", "fail"),
                job("b", dependencies=[Dependency(parent="a")]),
                job("c", dependencies=[Dependency(parent="a", condition=Condition.ON_FAILURE)]),
            ]
        )
        assert (await farm.wait("a")).status == "failed"
        assert (await farm.wait("c")).status == "completed"
        b = await farm.wait("b")
        assert not farm.works.of("b")
        assert b.status == "cancelled"
        assert b.reason is not None
        assert "waits on a (on_success), but a failed" in b.reason


async def test_a_waiting_dependant_stays_blocked_until_its_parent_is_retried() -> None:
    """With on_parent_failure = "wait", B stays blocked (why says so); retrying A releases B."""
    async with open_farm() as farm:
        await farm.engine.submit(
            [
                job("a", "flaky", "1", retries=RetryPolicy(max_attempts=1)),
                job("b", dependencies=[Dependency(parent="a", on_parent_failure="wait")]),
            ]
        )
        assert (await farm.wait("a")).status == "failed"
        why = await farm.engine.why("b")
        assert "can no longer run" in why
        assert "a failed" in why
        [b] = await farm.engine.status("b")
        assert b.status == "active"
        assert await farm.engine.retry("a") == [0]
        assert (await farm.wait("a")).status == "completed"
        assert (await farm.wait("b")).status == "completed"


# -- invalid submissions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "error", "mentions"),
    [
        pytest.param(
            [job("b", dependencies=[Dependency(parent="ghost")])],
            UnknownDependencyError,
            "ghost",
            id="unknown-dependency",
        ),
        pytest.param(
            [
                job("x", dependencies=[Dependency(parent="y")]),
                job("y", dependencies=[Dependency(parent="x")]),
            ],
            DependencyCycleError,
            "x",
            id="cycle",
        ),
        pytest.param([job("taken")], SpecError, "already exists", id="duplicate-id"),
        pytest.param([job("twin"), job("twin")], SpecError, "twin", id="duplicate-in-batch"),
        pytest.param(
            [job("big", resources=Resources.of(cores=1, gpus=1))],
            SpecError,
            "gpus",
            id="no-node-fits",
        ),
        pytest.param(
            [job("fine"), job("huge", resources=Resources.of(cores=64))],
            SpecError,
            "cores",
            id="all-or-nothing",
        ),
    ],
)
async def test_an_invalid_submission_is_rejected_and_journals_nothing(
    specs: list[SubmitJob], error: type[Exception], mentions: str
) -> None:
    """A bad submission raises a clear error and leaves the journal exactly as it was."""
    async with open_farm() as farm:
        await farm.engine.submit([job("taken")])
        await farm.wait("taken")
        before = await farm.journal.last_position()
        with pytest.raises(error, match=mentions):
            await farm.engine.submit(specs)
        assert await farm.journal.last_position() == before
        assert [s.job_id for s in await farm.engine.status()] == ["taken"]
        # The scheduler survived: a good submission still goes through.
        await farm.engine.submit([job("after")])
        assert (await farm.wait("after")).status == "completed"


async def test_a_cycle_error_names_the_cycle_path() -> None:
    """The cycle error carries the path of the cycle."""
    async with open_farm() as farm:
        with pytest.raises(DependencyCycleError) as caught:
            await farm.engine.submit(
                [
                    job("x", dependencies=[Dependency(parent="z")]),
                    job("y", dependencies=[Dependency(parent="x")]),
                    job("z", dependencies=[Dependency(parent="y")]),
                ]
            )
    assert {"x", "y", "z"} <= {part.split("[")[0].split(":")[-1] for part in caught.value.cycle}


# -- retries, blocklists, quarantine ------------------------------------------------------------


async def test_retries_wait_their_backoff_on_the_virtual_clock() -> None:
    """Failing twice then succeeding: the retries start exactly 30 s and 60 s later."""
    async with open_farm(settings=EngineSettings(blocklist_after=10)) as farm:
        retries = RetryPolicy(max_attempts=3, backoff=30)
        await farm.engine.submit([job("a", "flaky", "2", retries=retries)])
        summary = await farm.wait("a")
        events = await farm.events("a")
    assert summary.status == "completed"
    runs = farm.works.of("a")
    assert [r.attempt for r in runs] == [1, 2, 3]
    assert [r.at - runs[0].at for r in runs] == [0.0, 30.0, 90.0]
    failed = [e for e in events if isinstance(e, TaskFailed)]
    assert [e.error for e in failed] == [
        "RuntimeError: flaky attempt 1",
        "RuntimeError: flaky attempt 2",
    ]
    [completed] = [e for e in events if isinstance(e, TaskCompleted)]
    assert completed.runtime_s == 0.0  # no virtual time passed while the work was running


async def test_a_task_failing_every_attempt_fails_the_job_with_the_reason() -> None:
    """After max_attempts failures the job fails, its reason naming the task and the error."""
    async with open_farm() as farm:
        await farm.engine.submit(
            [job("a", "fail", tasks=2, retries=RetryPolicy(max_attempts=2, backoff=0))]
        )
        summary = await farm.wait("a")
    assert summary.status == "failed"
    assert summary.reason is not None
    assert "failed after 2 attempt(s)" in summary.reason
    assert "boom" in summary.reason
    assert len(farm.works.of("a", 0)) <= 2


async def test_a_retry_prefers_a_different_node() -> None:
    """The second attempt of a task that failed goes to the other, equally good node."""
    async with open_farm({"n1": CPU4, "n2": CPU4}) as farm:
        await farm.engine.submit(
            [job("a", "flaky", "1", retries=RetryPolicy(max_attempts=2, backoff=0))]
        )
        assert (await farm.wait("a")).status == "completed"
    first, second = farm.works.of("a")
    assert first.node != second.node


async def test_a_job_avoids_a_node_after_blocklist_after_failures_there() -> None:
    """Two failures on n1 blocklist it for the job; the third attempt waits for another node."""
    settings = EngineSettings(blocklist_after=2, quarantine_after=10)
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        retries = RetryPolicy(max_attempts=3, backoff=0)
        await farm.engine.submit([job("a", "fail_on", "n1", retries=retries)])
        await farm.wait_for_event("a", NodeBlocklisted)
        assert [r.node for r in farm.works.of("a")] == ["n1", "n1"]
        assert "blocklisted" in await farm.engine.why("a")
        await farm.add_node("n2")
        assert (await farm.wait("a")).status == "completed"
        events = await farm.events("a")
    [blocked] = [e for e in events if isinstance(e, NodeBlocklisted)]
    assert blocked.node == "n1"
    assert [r.node for r in farm.works.of("a")] == ["n1", "n1", "n2"]


async def test_a_blocklisted_node_is_used_again_the_moment_the_blocklist_expires() -> None:
    """With n1 the only node, the third attempt starts exactly when its blocklist ends."""
    settings = EngineSettings(blocklist_after=2, blocklist_for=600, quarantine_after=10)
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        retries = RetryPolicy(max_attempts=3, backoff=30)
        await farm.engine.submit([job("a", "flaky", "2", retries=retries)])
        assert (await farm.wait("a")).status == "completed"
    runs = farm.works.of("a")
    assert [r.at - runs[0].at for r in runs] == [0.0, 30.0, 630.0]


async def test_a_node_with_consecutive_failures_is_quarantined() -> None:
    """quarantine_after failed attempts in a row quarantine the node: journaled, no more work."""
    settings = EngineSettings(quarantine_after=3, blocklist_after=10)
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        for name in ("a", "b", "c"):
            await farm.engine.submit([job(name, "fail")])
            await farm.wait(name)
        [node] = await farm.engine.nodes()
        assert node.health == "quarantined"
        node_events = [r.event for r in await farm.journal.read_stream("node:n1")]
        assert any(
            isinstance(e, NodeHealthChanged) and e.health == "quarantined" for e in node_events
        )
        await farm.engine.submit([job("d")])
        assert "no node is online" in await farm.engine.why("d")
        assert not farm.works.of("d")


# -- stale reports and lost nodes ---------------------------------------------------------------


async def test_a_requeued_task_rejects_the_old_attempts_late_reports() -> None:
    """After remove_node requeues a task, the old token's reports are refused and change nothing."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([job("a", "block", "gate")])
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 1)
        await farm.add_node("n2")
        await farm.engine.remove_node("n1", reason="unplugged")
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 2)
        old, new = farm.works.of("a")
        assert (old.node, new.node) == ("n1", "n2")
        assert new.token > old.token
        # The attempt left on the removed node is stopped.
        await farm.works.wait_until(lambda: old in farm.works.cancelled)
        before = await farm.journal.last_position()
        ref = farm.engine.job_ref("a")
        assert ref is not None
        identity: AttemptIdentity = {
            "job_id": "a",
            "task_id": "0",
            "attempt": old.attempt,
            "fencing_token": old.token,
        }
        for report in (
            AttemptProgress(fraction=0.9, **identity),
            AttemptFinished(outcome="completed", **identity),
        ):
            accepted = await ref.ask(ReportAttempt(report=report, node="n1"), timeout=WAIT)
            assert accepted is False
        assert await farm.journal.last_position() == before
        [summary] = await farm.engine.status("a", tasks=True)
        assert summary.tasks[0].status == "running"
        assert summary.tasks[0].node == "n2"
        farm.works.open("gate")
        assert (await farm.wait("a")).status == "completed"
        events = await farm.events("a")
    assert len([e for e in events if isinstance(e, TaskCompleted)]) == 1
    [requeued] = [e for e in events if isinstance(e, TaskRequeued)]
    assert requeued.token == old.token
    assert "unplugged" in requeued.reason


# -- cancel -------------------------------------------------------------------------------------


async def test_cancel_stops_running_attempts_and_cancels_pending_tasks() -> None:
    """Pending tasks are cancelled at once, the running one is stopped, the job is cancelled."""
    async with open_farm({"n1": Resources.of(cores=1, memory="1GiB")}) as farm:
        await farm.engine.submit([job("a", "block", "gate", tasks=3)])
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 1)
        summary = await farm.engine.cancel("a", reason="wrong camera")
        assert summary.task_counts.get("cancelled") == 2
        final = await farm.wait("a")
        events = await farm.events("a")
    assert final.status == "cancelled"
    assert final.reason == "wrong camera"
    assert farm.works.cancelled == farm.works.of("a")
    assert sorted(e.task for e in events if isinstance(e, TaskCancelled)) == [0, 1, 2]
    assert not any(isinstance(e, TaskCompleted) for e in events)
    assert isinstance(events[-1], JobFinished)
    assert events[-1].outcome == "cancelled"


async def test_cancelling_a_finished_job_changes_nothing() -> None:
    """Cancel on a passivated job returns its summary and journals nothing."""
    async with open_farm() as farm:
        await farm.engine.submit([job("a")])
        await farm.wait("a")
        before = await farm.journal.last_position()
        summary = await farm.engine.cancel("a")
        assert summary.status == "completed"
        assert await farm.journal.last_position() == before


# -- checkpoints --------------------------------------------------------------------------------


async def test_a_retry_resumes_from_the_checkpoint_of_the_failed_attempt() -> None:
    """The failed attempt's checkpoint is journaled and handed to the retry as resume_from."""
    async with open_farm() as farm:
        retries = RetryPolicy(max_attempts=2, backoff=0)
        await farm.engine.submit([job("a", "checkpoint_then_fail", retries=retries)])
        assert (await farm.wait("a")).status == "completed"
        events = await farm.events("a")
    first, second = farm.works.of("a")
    assert first.resume_from is None
    assert second.resume_from == "step-5"
    assert any(isinstance(e, TaskCheckpointed) and e.checkpoint == "step-5" for e in events)
    assigned = [e for e in events if isinstance(e, TaskAssigned)]
    assert [e.resume_from for e in assigned] == [None, "step-5"]


# -- why ----------------------------------------------------------------------------------------


async def test_why_names_the_missing_resource() -> None:
    """A GPU job with only a CPU node online says GPUs are short, and the rank is explained."""
    async with open_farm({"cpu": CPU4, "gpu": GPU2}) as farm:
        await farm.engine.remove_node("gpu", reason="driver update")
        await farm.engine.submit([job("a", resources=Resources.of(cores=1, gpus=1))])
        why = await farm.engine.why("a")
        assert why.splitlines()[0].startswith("priority medium (FIFO within priority")
        assert "no online node is big enough" in why
        assert "gpus: needs 1, has 0" in why


async def test_why_says_every_fitting_node_is_busy() -> None:
    """A job waiting behind a busy node says so, and names its running count."""
    async with open_farm({"n1": Resources.of(cores=1, memory="1GiB")}) as farm:
        await farm.engine.submit([job("a", "block", "gate"), job("b")])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        assert "all 1 nodes that fit are busy" in await farm.engine.why("b")
        assert "1 task(s) running" in await farm.engine.why("a")
        with pytest.raises(JobNotFoundError):
            await farm.engine.why("nobody")
        farm.works.open("gate")
        await farm.wait("b")
        assert await farm.engine.why("b") == "job b is completed"


# -- batching -----------------------------------------------------------------------------------


async def test_reports_to_one_job_are_committed_in_fewer_commits_than_reports() -> None:
    """Many attempts reporting at once to one job share commits (the actor's batch)."""
    clock = VirtualClock(auto_advance=True)
    journal = CountingJournal(clock=clock)
    async with open_farm(
        {"n1": Resources.of(cores=32, memory="64GiB")}, journal=journal, clock=clock
    ) as farm:
        await farm.engine.submit([job("a", "chatty", "5", tasks=16)])
        assert (await farm.wait("a")).status == "completed"
        events = await farm.events("a")
    # Each task: started, 5 metrics, finished = 7 reports.
    reports = 16 * 7
    assert len(events) >= reports
    assert journal.appends["job:a"] < reports


# -- the real subprocess executor ---------------------------------------------------------------


@asynccontextmanager
async def open_subprocess_farm(tmp_path: Path) -> AsyncIterator[Engine]:
    clock = SystemClock()
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with (
        open_subprocess_executor(
            log_dir=tmp_path / "logs", checkpoint_dir=tmp_path / "ck", clock=clock
        ) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("local", CPU4, executor=executor)
        yield engine


def python_job(
    job_id: str, code: str, *, tasks: int = 1, retries: RetryPolicy = NO_RETRY
) -> SubmitJob:
    return SubmitJob(
        job_id=job_id,
        name=job_id,
        command=(sys.executable, "-c", code, "{task}"),
        resources=ONE,
        tasks=tuple(TaskSpec(index=i, name=str(i)) for i in range(tasks)),
        retries=retries,
    )


async def test_subprocess_tasks_complete_and_failures_carry_stderr(tmp_path: Path) -> None:
    """Real processes: exit 0 completes the job; a non-zero exit fails it with the stderr line."""
    ok = "import sys; print('@taskfarm progress 0.5', flush=True); print('done', sys.argv[1])"
    bad = "import sys; sys.stderr.write('disk full\\n'); sys.exit(3)"
    async with open_subprocess_farm(tmp_path) as engine:
        await engine.submit([python_job("good", ok, tasks=2), python_job("bad", bad)])
        with anyio.fail_after(WAIT * 3):
            good = await engine.wait_job("good")
            failed = await engine.wait_job("bad")
    assert good.status == "completed"
    assert failed.status == "failed"
    assert failed.reason is not None
    assert "disk full" in failed.reason


async def test_a_subprocess_retry_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """A process reports a checkpoint and dies; its retry sees TASKFARM_RESUME_FROM."""
    out = tmp_path / "resumed.txt"
    code = (
        "import os, sys\n"
        "resume = os.environ.get('TASKFARM_RESUME_FROM')\n"
        "if resume is None:\n"
        "    print('@taskfarm checkpoint frame-12', flush=True)\n"
        "    sys.exit(1)\n"
        f"open({str(out)!r}, 'w').write(resume)\n"
    )
    async with open_subprocess_farm(tmp_path) as engine:
        await engine.submit(
            [python_job("sim", code, retries=RetryPolicy(max_attempts=2, backoff=0))]
        )
        with anyio.fail_after(WAIT * 3):
            summary = await engine.wait_job("sim")
    assert summary.status == "completed"
    assert out.read_text() == "frame-12"


async def test_a_spec_file_of_two_thousand_jobs_is_journaled_in_one_atomic_append() -> None:
    """Submitting 2,000 jobs (a chain of dependants) is one multi-stream append, not one
    commit per job; the chain starts running in order."""
    clock = VirtualClock(auto_advance=True)
    journal = CountingJournal(clock=clock)
    specs = [job("j0")] + [
        job(f"j{i}", dependencies=[Dependency(parent=f"j{i - 1}")]) for i in range(1, 2000)
    ]
    async with open_farm({"n1": CPU4}, journal=journal, clock=clock) as farm:
        assert len(await farm.engine.submit(specs)) == 2000
        assert journal.multi_appends == [2000]
        assert (await farm.wait("j3")).status == "completed"
        records = [r async for batch in journal.read_all() for r in batch]
    submitted = [r.position for r in records if isinstance(r.event, JobSubmitted)]
    assert submitted == list(range(submitted[0], submitted[0] + 2000))  # one commit, contiguous
