"""A short task costs two journal commits (its assignment; its start and end together), so a
chain of dependent tasks is not three fsyncs per link."""

from __future__ import annotations

from pathlib import Path

import anyio
from engine_farm import CPU4, WAIT, job

from actors import ENGINE_CODEC, Dependency, TaskCompleted, TaskStarted, job_stream, open_engine
from actors.executors import AttemptContext, open_inprocess_executor
from persistence import open_sqlite_journal
from runtime import VirtualClock


async def _ok(ctx: AttemptContext) -> None:
    return None


async def test_a_chain_commits_assignment_then_start_and_end_together(tmp_path: Path) -> None:
    """Ten chained no-op tasks: each link is one commit for the assignment and one for the
    start and the end (the start waits for the end's commit), all events journaled in order."""
    clock = VirtualClock(auto_advance=True)
    links = 10
    spec = job(
        "chain",
        "ok",
        tasks=links,
        dependencies=[
            Dependency(parent="chain", parent_task=i - 1, child_task=i) for i in range(1, links)
        ],
    )
    async with open_sqlite_journal(
        tmp_path / "j.db", clock=clock, codec=ENGINE_CODEC, synchronous="FULL"
    ) as journal:
        async with (
            open_inprocess_executor({"ok": _ok}, clock=clock) as executor,
            open_engine(journal=journal, clock=clock) as engine,
        ):
            await engine.add_node("n1", CPU4, executor=executor)
            before = journal.statistics().commits
            await engine.submit([spec])
            with anyio.fail_after(WAIT):
                assert (await engine.wait_job("chain")).status == "completed"
            commits = journal.statistics().commits - before
        records = await journal.read_stream(job_stream("chain"))
    # The submission, two per link (the last link's end carries the job's end), and the
    # finished job's snapshot; at most one more, when the virtual clock reaches a start's
    # 50 ms flush while the attempt is being handed over (three per link was 1 + 3 * links + 1).
    assert 1 + 2 * links + 1 <= commits <= 1 + 2 * links + 2
    for index in range(links):
        kinds = [
            type(r.event)
            for r in records
            if isinstance(r.event, TaskStarted | TaskCompleted) and r.event.task == index
        ]
        assert kinds == [TaskStarted, TaskCompleted]
