"""A finished job leaves its final state as a snapshot, so that a restart reads one row for it
instead of replaying its history."""

from __future__ import annotations

import anyio
from engine_farm import CPU4, WAIT, job

from actors import ENGINE_CODEC, Dependency, JobAggregate, JobState, job_stream, open_engine
from actors.executors import AttemptContext, open_inprocess_executor
from persistence import InMemoryJournal
from runtime import VirtualClock


async def _ok(ctx: AttemptContext) -> None:
    return None


async def test_a_finished_job_snapshots_its_final_state_and_a_restart_uses_it() -> None:
    """The snapshot is at the stream's last version with the finished status; a reopened engine
    knows the job as finished (a dependant submitted after the restart runs at once)."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with (
        open_inprocess_executor({"ok": _ok}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", CPU4, executor=executor)
        await engine.submit([job("parent", "ok", tasks=3)])
        with anyio.fail_after(WAIT):
            assert (await engine.wait_job("parent")).status == "completed"
    events = await journal.read_stream(job_stream("parent"))
    snapshot = await journal.load_snapshot(
        job_stream("parent"), JobState, schema_version=JobAggregate.schema_version
    )
    assert snapshot is not None
    version, state = snapshot
    assert version == events[-1].version
    assert state.status == "completed"
    async with (
        open_inprocess_executor({"ok": _ok}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", CPU4, executor=executor)
        await engine.submit([job("child", "ok", dependencies=[Dependency(parent="parent")])])
        with anyio.fail_after(WAIT):
            assert (await engine.wait_job("child")).status == "completed"
