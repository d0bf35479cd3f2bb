"""checkpoint_warning before a planned drain: the engine asks a checkpointable attempt to
checkpoint that long before its node drains (as Slurm's ``--signal`` before a walltime)."""

from __future__ import annotations

from datetime import timedelta

from engine_farm import CPU4, job, open_farm

from actors import TaskCheckpointRequested, TaskPreempted


async def test_an_attempt_is_asked_to_checkpoint_its_warning_before_a_planned_drain() -> None:
    """drain --at T with checkpoint_warning = 10m: at T - 10m exactly the attempt is asked to
    checkpoint (journaled with the reason); a job without a warning on the same node is not
    asked; at T both yield.  (The works sleep on the virtual clock, so time can pass.)"""
    async with open_farm({"n1": CPU4}) as farm:
        warned = job("warned", "steps", "100", "60", checkpointable=True, checkpoint_warning=600)
        quiet = job("quiet", "steps", "100", "60", checkpointable=True)
        await farm.engine.submit([warned, quiet])
        await farm.works.wait_until(lambda: len(farm.works.runs) == 2)
        at = farm.clock.now() + timedelta(hours=1)
        await farm.engine.set_node_health("n1", "draining", reason="kernel update", at=at)
        await farm.wait_for_event("warned", TaskPreempted)
        await farm.wait_for_event("quiet", TaskPreempted)
        records = await farm.journal.read_stream("job:warned")
        (request,) = [r for r in records if isinstance(r.event, TaskCheckpointRequested)]
        (preempted,) = [r for r in records if isinstance(r.event, TaskPreempted)]
        assert request.timestamp == at - timedelta(seconds=600)
        assert preempted.timestamp == at
        assert isinstance(request.event, TaskCheckpointRequested)
        assert "node n1 drains at" in request.event.reason
        assert "checkpoint_warning 600 s" in request.event.reason
        assert not [e for e in await farm.events("quiet") if isinstance(e, TaskCheckpointRequested)]
