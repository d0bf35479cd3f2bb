"""What the engine tells an operator: task names in ``why``, when an attempt started, the
metric series, and what a reopened engine recovered (a job whose tasks depend on each other
included)."""

from __future__ import annotations

import anyio
from engine_farm import CPU4, WAIT, open_farm

from actors import ENGINE_CODEC, RecoverySummary, open_engine
from persistence import InMemoryJournal
from runtime import VirtualClock

SPEC = """
[[jobs]]
name = "sim"
command = ["inprocess:block", "g"]
[[jobs.tasks]]
name = "stage-1"
[[jobs.tasks]]
name = "stage-2"
depends_on = ["stage-1"]
"""


async def test_why_names_stages_and_a_reopened_engine_says_what_it_recovered() -> None:
    """why names a blocked stage's parent by name (sim[stage-1], not sim[0]); the running
    attempt's start is in the summary; reopening the journal (a job whose tasks depend on each
    other) recovers it and counts the job, the attempt in doubt and the node."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with open_farm({"n1": CPU4}, journal=journal, clock=clock) as farm:
        assert farm.engine.recovery == RecoverySummary()
        await farm.engine.submit_text(SPEC, fmt="toml", source="sim.toml")
        await farm.works.wait_until(lambda: bool(farm.works.of("sim")))
        why = await farm.engine.why("sim")
        assert "stage-2: waits on sim[stage-1] to finish (on_success)" in why
        with anyio.fail_after(WAIT):
            while True:
                (summary,) = await farm.engine.status("sim", tasks=True)
                if summary.tasks[0].status == "running":
                    break
                await anyio.lowlevel.checkpoint()
        assert summary.tasks[0].started_at is not None
        assert summary.tasks[1].started_at is None
    with anyio.fail_after(WAIT):
        async with open_engine(journal=journal, clock=clock) as engine:
            assert engine.recovery == RecoverySummary(jobs=1, unfinished=1, in_doubt=1, nodes=1)
