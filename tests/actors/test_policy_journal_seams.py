"""The seams a domain needs to journal what it decides and to learn from everything the journal
holds: events a policy decides by itself each cycle (journaled in its stream, applied, replayed
on restart), and the observations of submissions and previews (live, and in the history
``recover`` gets)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import anyio
import pytest
import structlog
from engine_farm import CPU4, WAIT, job

from actors import (
    ENGINE_CODEC,
    AttemptContext,
    FarmView,
    FifoPolicy,
    JobSubmittedObservation,
    JobView,
    Observation,
    TaskPreviewObservation,
    open_engine,
    open_inprocess_executor,
)
from persistence import Event, EventCodec, InMemoryJournal
from runtime import ConfigurationError, VirtualClock

CODEC = EventCodec()
CODEC.update(ENGINE_CODEC)


@CODEC.register
class Noticed(Event, frozen=True, kw_only=True, tag="test.seams.noticed"):
    job_id: str
    queued: int


class Noticing(FifoPolicy):
    """Journals, once per job, that it saw the job queued (a fact it decided by itself), and
    records every observation."""

    name = "noticing"
    history = True

    def __init__(self) -> None:
        self.noticed: dict[str, int] = {}
        self.observed: list[Observation] = []
        self.recovered: list[Observation] = []

    def cycle_events(self, farm: FarmView, now: datetime) -> Sequence[Event]:
        return [
            Noticed(job_id=job_id, queued=view.queued)
            for job_id, view in sorted(farm.jobs.items())
            if job_id not in self.noticed
        ]

    def apply(self, event: Event) -> None:
        if isinstance(event, Noticed):
            self.noticed[event.job_id] = event.queued

    def observe(self, observation: Observation) -> None:
        self.observed.append(observation)

    def recover(self, observations: Sequence[Observation]) -> None:
        self.recovered.extend(observations)

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[object, ...]:
        return super().rank(job, farm, now)


async def _preview(ctx: AttemptContext) -> None:
    await ctx.preview(f"previews/{ctx.spec.job_id}-{ctx.spec.task_id}.png")


async def test_cycle_events_are_journaled_applied_once_and_replayed_on_restart() -> None:
    """A fact the policy decides in a cycle is journaled in its stream and folded in (so it is
    not decided again); a new engine over the journal has it back before any cycle."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=CODEC)
    async with (
        open_inprocess_executor({"preview": _preview}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=Noticing()) as engine,
    ):
        await engine.add_node("n1", CPU4, executor=executor)
        [job_id] = await engine.submit([job("a", "preview", tasks=3)])
        with anyio.fail_after(WAIT):
            await engine.wait_job(job_id)
        records = await journal.read_stream("policy:noticing")
        assert [(r.event.job_id, r.event.queued) for r in records] == [("a", 0)]  # type: ignore[attr-defined]
    policy = Noticing()
    async with open_engine(journal=journal, clock=clock, policy=policy):
        assert policy.noticed == {"a": 0}
    assert len(await journal.read_stream("policy:noticing")) == 1


async def test_submissions_and_previews_are_observed_live_and_in_the_history() -> None:
    """The policy observes a job's submission (its prepared spec) before its tasks, and each
    preview an attempt reports; recover gets the same facts from the journal after a restart."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=CODEC)
    live = Noticing()
    async with (
        open_inprocess_executor({"preview": _preview}, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=live) as engine,
    ):
        await engine.add_node("n1", CPU4, executor=executor)
        await engine.submit([job("a", "preview", tasks=2)])
        with anyio.fail_after(WAIT):
            await engine.wait_job("a")
    restarted = Noticing()
    async with open_engine(journal=journal, clock=clock, policy=restarted):
        pass
    for seen in (live.observed, restarted.recovered):
        submitted = [o for o in seen if isinstance(o, JobSubmittedObservation)]
        assert [(o.job_id, len(o.spec.tasks)) for o in submitted] == [("a", 2)]
        of_job = [o for o in seen if getattr(o, "job_id", None) == "a"]
        assert of_job[0] is submitted[0]
        previews = sorted((o.task, o.path) for o in seen if isinstance(o, TaskPreviewObservation))
        assert previews == [(0, "previews/a-0.png"), (1, "previews/a-1.png")]


class Declaring(Noticing):
    """Noticing, with its events declared: the codec a journal must know."""

    name = "declaring"
    events: EventCodec | None = CODEC


async def test_an_engine_refuses_a_journal_that_cannot_store_the_policys_events() -> None:
    """A policy that declares its events is refused over a journal whose codec lacks them (at
    open, naming the policy and an event), instead of failing when it first journals one."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    with pytest.raises(ConfigurationError, match=r"'declaring'.*test\.seams\.noticed"):
        async with open_engine(journal=journal, clock=clock, policy=Declaring()):
            pass
    async with open_engine(
        journal=InMemoryJournal(clock=clock, codec=CODEC), clock=clock, policy=Declaring()
    ):
        pass


async def test_an_event_the_journal_cannot_store_is_a_contained_policy_error() -> None:
    """Cycle events the codec cannot encode are logged once as a policy error; the engine
    goes on scheduling and the jobs complete."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)  # lacks Noticed
    with structlog.testing.capture_logs() as logs:
        async with (
            open_inprocess_executor({"preview": _preview}, clock=clock) as executor,
            open_engine(journal=journal, clock=clock, policy=Noticing()) as engine,
        ):
            await engine.add_node("n1", CPU4, executor=executor)
            await engine.submit([job("a", "preview", tasks=2)])
            with anyio.fail_after(WAIT):
                summary = await engine.wait_job("a")
    assert summary.status == "completed"
    errors = [e for e in logs if e["event"] == "policy_error"]
    assert errors
    assert all(e["hook"] == "cycle_events" for e in errors)
    assert "Noticed" in errors[0]["error"]
