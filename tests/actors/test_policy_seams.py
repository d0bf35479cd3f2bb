"""The seams a domain plugs into: live views, observations, holds, wake-ups, submission and
status hooks, the failure hook, placement constraints, farm-wide counters, contained policy
errors -- and threshold dependencies, which now fire on progress."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from engine_farm import CPU4, ONE, WAIT, job, open_farm

from actors import (
    ENGINE_CODEC,
    CommandResult,
    Dependency,
    EngineSettings,
    Failure,
    FarmView,
    FifoPolicy,
    Hold,
    JobView,
    NodeAction,
    NodeChanged,
    NodeHealthChanged,
    NodeView,
    Observation,
    Resources,
    RetryDecision,
    RetryPolicy,
    SpecError,
    SubmitJob,
    TaskEndedObservation,
    TaskStartedObservation,
    TaskView,
)
from persistence import Event, EventCodec, InMemoryJournal
from runtime import ConfigurationError, VirtualClock

THREE_CORES = Resources.of(cores=3, memory="8GiB")


async def test_a_threshold_dependant_starts_when_the_parent_reaches_it() -> None:
    """4 tasks of 100 s on 3 cores: at t = 100 s three are done (75 % >= 50 %) and a core is
    free, so the child starts then, not when the parent finishes at 200 s."""
    async with open_farm({"n1": THREE_CORES}) as farm:
        await farm.engine.submit(
            [
                job("parent", "sleep", "100", tasks=4),
                job(
                    "child", "sleep", "1", dependencies=[Dependency(parent="parent", threshold=0.5)]
                ),
            ]
        )
        await farm.wait("child")
        await farm.wait("parent")
        [child] = farm.works.of("child")
        assert child.at == pytest.approx(100.0)


async def test_a_threshold_counts_reported_progress_of_running_tasks() -> None:
    """One 4-step task that reports progress: the child starts at 50 % (t = 20 s), not at 40 s."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit(
            [
                job("parent", "steps", "4", "10"),
                job("child", "ok", dependencies=[Dependency(parent="parent", threshold=0.5)]),
            ]
        )
        await farm.wait("child")
        [child] = farm.works.of("child")
        assert child.at == pytest.approx(20.0)


# -- live views -----------------------------------------------------------------------------


class Recorder(FifoPolicy):
    """Records what the hooks saw (a policy that only looks)."""

    def __init__(self) -> None:
        self.free_seen: list[int] = []
        self.rank_farms: list[int] = []
        self.observations: list[Observation] = []
        self.admit_job_calls: dict[str, int] = {}

    def rank(self, job: JobView, farm: FarmView, now: datetime) -> tuple[Any, ...]:
        self.rank_farms.append(len(farm.jobs))
        return super().rank(job, farm, now)

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        self.free_seen.append(farm.nodes["n1"].free.millicores)
        return None

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        self.admit_job_calls[job.job_id] = self.admit_job_calls.get(job.job_id, 0) + 1
        return None

    def observe(self, observation: Observation) -> None:
        self.observations.append(observation)


async def test_the_farm_view_is_complete_and_current_within_a_cycle() -> None:
    """rank sees every live job (blocked ones too); admit sees each placement's resources go."""
    policy = Recorder()
    async with open_farm({"n1": CPU4}, policy=policy) as farm:
        await farm.engine.submit(
            [
                job("a", "block", "a", tasks=3),
                job("b", dependencies=[Dependency(parent="a")]),  # blocked: still in the view
            ]
        )
        await farm.works.wait_until(lambda: len(farm.works.of("a")) == 3)
        assert policy.free_seen[:3] == [4000, 3000, 2000]
        assert 2 in policy.rank_farms
        view = farm.engine.core.farm.jobs["a"]
        assert (view.running, view.queued, view.total) == (3, 0, 3)
        assert view.children == ("b",)
        assert farm.engine.core.farm.jobs["b"].parents == ("a",)
        assert farm.engine.core.farm.jobs["b"].blocked == 1
        assert len(farm.engine.core.farm.running["n1"]) == 3
        farm.works.open("a")
        await farm.wait("b")


async def test_the_policy_observes_starts_ends_and_node_changes_in_order() -> None:
    """observe() gets the node joining, each start before its end, with outcome and runtime."""
    policy = Recorder()
    async with open_farm({"n1": CPU4}, policy=policy) as farm:
        await farm.engine.submit([job("a", "sleep", "30", tasks=2)])
        await farm.wait("a")
    kinds = [type(o).__name__ for o in policy.observations]
    assert kinds[0] == "NodeChanged"
    starts = [o for o in policy.observations if isinstance(o, TaskStartedObservation)]
    ends = [o for o in policy.observations if isinstance(o, TaskEndedObservation)]
    assert sorted(o.task for o in starts) == [0, 1]
    assert sorted((o.task, o.outcome, o.node) for o in ends) == [
        (0, "completed", "n1"),
        (1, "completed", "n1"),
    ]
    assert all(o.runtime_s == pytest.approx(30.0) for o in ends)
    for end in ends:
        start = next(s for s in starts if s.task == end.task)
        assert policy.observations.index(start) < policy.observations.index(end)
    assert isinstance(policy.observations[0], NodeChanged)


# -- holds and wake-ups -----------------------------------------------------------------------


class OffPeak(FifoPolicy):
    """Holds every job until 02:00 (a whole-job deferral), counting its calls."""

    def __init__(self, until: datetime) -> None:
        self.until = until
        self.admit_calls = 0
        self.admit_job_calls = 0

    def admit_job(self, job: JobView, farm: FarmView, now: datetime) -> Hold | None:
        self.admit_job_calls += 1
        if now < self.until:
            return Hold("deferred to off-peak", until=self.until)
        return None

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        self.admit_calls += 1
        return None


async def test_a_job_held_until_a_time_costs_one_call_and_starts_at_that_time() -> None:
    """A 10,000-task job held until 02:00: admit is never called per task while it is held,
    ``why`` says so, and its first task starts exactly at 02:00."""
    clock = VirtualClock(auto_advance=True)
    until = clock.now() + timedelta(hours=2)
    policy = OffPeak(until)
    async with open_farm({"n1": CPU4}, clock=clock, policy=policy) as farm:
        await farm.engine.submit([job("big", tasks=10_000)])
        with anyio.fail_after(WAIT):
            while "held by policy until" not in await farm.engine.why("big"):
                await anyio.lowlevel.checkpoint()
        assert policy.admit_calls == 0
        assert farm.works.of("big") == []
        await farm.works.wait_until(lambda: bool(farm.works.of("big")))
        assert farm.works.of("big")[0].at == pytest.approx(7200.0)


class Tariff(FifoPolicy):
    """Asks for a cycle at a tariff boundary (nothing else would trigger one)."""

    def __init__(self, boundary: datetime) -> None:
        self.boundary = boundary
        self.cycles_after: list[datetime] = []

    cycle_interval = 86_400.0

    def admit(self, job: JobView, task: TaskView, farm: FarmView, now: datetime) -> str | None:
        if now < self.boundary:
            return "waiting for the night tariff"
        return None

    def next_wakeup(self, now: datetime) -> datetime | None:
        return self.boundary if now < self.boundary else None


async def test_next_wakeup_runs_a_cycle_at_the_time_the_policy_asks_for() -> None:
    """With no other trigger, the task starts exactly at the boundary the policy named."""
    clock = VirtualClock(auto_advance=True)
    boundary = clock.now() + timedelta(minutes=37)
    async with open_farm({"n1": CPU4}, clock=clock, policy=Tariff(boundary)) as farm:
        await farm.engine.submit([job("a")])
        await farm.wait("a")
        assert farm.works.of("a")[0].at == pytest.approx(37 * 60.0)


# -- submission and status hooks --------------------------------------------------------------


class RenderMeta(msgspec.Struct, forbid_unknown_fields=True):
    client: str
    tier: str = "standard"


class Studio(FifoPolicy):
    """Validates, prepares and describes jobs; declares its metadata struct."""

    metadata_type: type[Any] | None = RenderMeta

    def validate(self, spec: SubmitJob, now: datetime) -> None:
        if spec.metadata_as(RenderMeta).client == "unknown-studio":
            raise SpecError(path=spec.source, field="metadata.client", problem="unknown client")

    def prepare(self, spec: SubmitJob, now: datetime) -> SubmitJob:
        return msgspec.structs.replace(spec, labels=(*spec.labels, "prepared"))

    def describe(self, job: JobView, now: datetime) -> Mapping[str, str]:
        return {"client": job.metadata.client}


def meta(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


async def test_validate_prepare_describe_and_metadata_run_for_every_submission() -> None:
    """Bad metadata and a refused client are errors naming the field; prepare's change is
    journaled; describe's columns reach status and why."""
    async with open_farm({"n1": CPU4}, policy=Studio()) as farm:
        with pytest.raises(SpecError, match="metadata"):
            await farm.engine.submit([job("x", metadata=meta(client=1))])
        with pytest.raises(SpecError, match="unknown client"):
            await farm.engine.submit([job("y", metadata=meta(client="unknown-studio"))])
        assert await farm.engine.status() == []
        await farm.engine.submit([job("a", "block", "g", metadata=meta(client="acme"))])
        await farm.works.wait_until(lambda: bool(farm.works.of("a")))
        [summary] = await farm.engine.status("a")
        assert summary.domain == {"client": "acme"}
        assert "client: acme" in await farm.engine.why("a")
        assert farm.engine.core.farm.jobs["a"].metadata == RenderMeta(client="acme")
        farm.works.open("g")
        await farm.wait("a")
        submitted = (await farm.events("a"))[0]
        assert "prepared" in submitted.job.labels  # type: ignore[attr-defined]


# -- contained policy errors ------------------------------------------------------------------


class Buggy(FifoPolicy):
    """Raises when it meets a job whose name says so."""

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        if job.job_id.startswith("bad"):
            raise ZeroDivisionError("division by zero in the score")
        return super().node_score(job, task, node, now)


async def test_a_policy_error_holds_its_job_logs_once_and_the_rest_keeps_scheduling() -> None:
    """The scheduler survives; the bad job is held naming the error; other jobs complete."""
    with structlog.testing.capture_logs() as logs:
        async with open_farm({"n1": CPU4}, policy=Buggy()) as farm:
            await farm.engine.submit([job("bad-1"), job("good")])
            assert (await farm.wait("good")).status == "completed"
            with anyio.fail_after(WAIT):
                while "policy error: node_score: ZeroDivisionError" not in (
                    await farm.engine.why("bad-1")
                ):
                    await anyio.lowlevel.checkpoint()
            await farm.engine.submit([job("good-2")])
            assert (await farm.wait("good-2")).status == "completed"
            assert farm.engine.scheduler.is_alive
    errors = [e for e in logs if e["event"] == "policy_error"]
    assert len(errors) == 1
    assert "ZeroDivisionError" in errors[0]["traceback"]


# -- the failure hook -------------------------------------------------------------------------


class MoreMemory(FifoPolicy):
    """Retries an OOM with twice the memory; holds anything else for an operator."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def on_failure(
        self,
        job: JobView,
        task: TaskView,
        failure: Failure,
        default: RetryDecision,
        now: datetime,
    ) -> RetryDecision:
        self.failures.append(failure)
        if failure.kind == "oom":
            bigger = msgspec.structs.replace(task.request, memory=task.request.memory * 2)
            return RetryDecision(action="retry", delay=60.0, resources=bigger)
        return RetryDecision(action="hold", reason="a human should look at this")


async def test_the_failure_hook_retries_an_oom_with_more_memory() -> None:
    """The OOM'd task runs again 60 s later with twice its memory (journaled with the failure)."""
    policy = MoreMemory()
    async with open_farm({"n1": Resources.of(cores=4, memory="8GiB")}, policy=policy) as farm:
        await farm.engine.submit([job("a", "oom_once", resources=ONE)])
        assert (await farm.wait("a")).status == "completed"
        first, second = farm.works.of("a")
        assert second.at - first.at == pytest.approx(60.0)
        assert [f.kind for f in policy.failures] == ["oom"]
        assert second.memory == 2 * ONE.memory


async def test_a_held_task_waits_for_an_operator_retry() -> None:
    """on_failure -> hold: the task is held (status and why say so) until ``retry`` runs it."""
    async with open_farm({"n1": CPU4}, policy=MoreMemory()) as farm:
        await farm.engine.submit([job("a", "flaky", "1", retries=RetryPolicy(max_attempts=5))])
        with anyio.fail_after(WAIT):
            while "a human should look at this" not in await farm.engine.why("a"):
                await anyio.lowlevel.checkpoint()
        [summary] = await farm.engine.status("a", tasks=True)
        assert summary.tasks[0].status == "held"
        assert len(farm.works.of("a")) == 1
        assert await farm.engine.retry("a", [0]) == [0]
        assert (await farm.wait("a")).status == "completed"


# -- placement constraints and counters -------------------------------------------------------


async def test_requires_places_only_on_nodes_with_the_label_and_why_names_it() -> None:
    """``requires = ["gpu", "os=linux"]``: only the node with both labels runs it; while that
    node drains, ``why`` names the label; a label no node has is refused at submission."""
    async with open_farm({}) as farm:
        await farm.engine.add_node("plain", CPU4, executor=farm.executor_for("plain"))
        await farm.engine.add_node(
            "mac", CPU4, executor=farm.executor_for("mac"), labels=["gpu", "os=macos"]
        )
        await farm.engine.add_node(
            "linux", CPU4, executor=farm.executor_for("linux"), labels=["gpu", "os=linux"]
        )
        with pytest.raises(SpecError, match="no node has the label 'os=windows'"):
            await farm.engine.submit([job("w", requires=("os=windows",))])
        await farm.engine.set_node_health("linux", "draining")
        await farm.engine.submit([job("a", requires=("gpu", "os=linux"))])
        with anyio.fail_after(WAIT):
            while "no online node has the label 'os=linux'" not in await farm.engine.why("a"):
                await anyio.lowlevel.checkpoint()
        await farm.engine.set_node_health("linux", "online")
        await farm.wait("a")
        assert [r.node for r in farm.works.of("a")] == ["linux"]


async def test_farm_wide_counters_bound_concurrency_across_nodes() -> None:
    """``counters = {nuke = 2}``: four nuke tasks on two nodes run two at a time."""
    settings = EngineSettings(counters={"nuke": 2})
    nuke = Resources.of(cores=1, memory="1GiB", counters={"nuke": 1})
    async with open_farm({"n1": CPU4, "n2": CPU4}, settings=settings) as farm:
        await farm.engine.submit([job("comp", "sleep", "10", tasks=4, resources=nuke)])
        await farm.wait("comp")
        starts = sorted(r.at for r in farm.works.of("comp"))
        assert starts == pytest.approx([0.0, 0.0, 10.0, 10.0])
        assert {r.node for r in farm.works.of("comp")} == {"n1", "n2"} or len(starts) == 4


async def test_a_counter_larger_than_the_farm_has_is_refused_or_explained() -> None:
    """A task needing more licences than the farm has can never run: why says so."""
    settings = EngineSettings(counters={"nuke": 1})
    async with open_farm({"n1": CPU4}, settings=settings) as farm:
        with pytest.raises(SpecError, match="needs 2 nuke licence"):
            await farm.engine.submit(
                [job("comp", resources=Resources.of(cores=1, counters={"nuke": 2}))]
            )


def _names(items: Sequence[Any]) -> list[str]:
    return [type(i).__name__ for i in items]


# -- domain commands --------------------------------------------------------------------------

DOMAIN_CODEC = EventCodec()
DOMAIN_CODEC.update(ENGINE_CODEC)


@DOMAIN_CODEC.register
class Reserved(Event, frozen=True, kw_only=True, tag="test.domain.reserved"):
    node: str
    until: datetime
    by: str | None = None


class Reserving(FifoPolicy):
    """Keeps nodes for reservations: a command journals one, ``admit`` respects it."""

    name = "reserving"
    command_roles: Mapping[str, str] = {"reservations": "read", "reserve": "operator"}

    def __init__(self) -> None:
        self.reserved: dict[str, datetime] = {}
        self.reserved_by: dict[str, str | None] = {}

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any],
        farm: FarmView,
        now: datetime,
        *,
        by: str | None = None,
    ) -> CommandResult:
        if name == "reservations":
            return CommandResult(reply={n: u.isoformat() for n, u in self.reserved.items()})
        if name == "reserve":
            node = str(arguments.get("node"))
            if node not in farm.nodes:
                raise ConfigurationError(f"no node {node!r}", where="--node")
            until = now + timedelta(hours=float(arguments.get("hours", 1)))
            return CommandResult(reply="reserved", events=[Reserved(node=node, until=until, by=by)])
        return super().command(name, arguments, farm, now, by=by)

    def apply(self, event: Event) -> None:
        if isinstance(event, Reserved):
            self.reserved[event.node] = event.until
            self.reserved_by[event.node] = event.by

    def node_score(
        self, job: JobView, task: TaskView, node: NodeView, now: datetime
    ) -> float | None:
        until = self.reserved.get(node.name)
        return None if until is not None and until > now else 0.0


async def test_a_policy_command_journals_its_events_and_a_restart_replays_them() -> None:
    """``reserve`` is journaled in the policy's stream and applied; a bad argument is a clear
    error; a new engine over the same journal has the reservation back."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=DOMAIN_CODEC)
    async with open_farm(
        {"n1": CPU4, "n2": CPU4}, clock=clock, journal=journal, policy=Reserving()
    ) as farm:
        assert await farm.engine.policy_command("reserve", {"node": "n1", "hours": 2}) == "reserved"
        with pytest.raises(ConfigurationError, match="no node 'n9'"):
            await farm.engine.policy_command("reserve", {"node": "n9"})
        with pytest.raises(ConfigurationError, match="has no command 'nope'"):
            await farm.engine.policy_command("nope")
        await farm.engine.submit([job("a", tasks=3)])
        await farm.wait("a")
        assert {r.node for r in farm.works.of("a")} == {"n2"}
        [record] = await journal.read_stream("policy:reserving")
        assert isinstance(record.event, Reserved)
    policy = Reserving()
    async with open_farm({"n1": CPU4}, clock=clock, journal=journal, policy=policy) as farm:
        assert set(await farm.engine.policy_command("reservations")) == {"n1"}
        assert policy.reserved["n1"] > clock.now()


async def test_a_policy_command_is_told_who_asked() -> None:
    """``Engine.policy_command(..., by=NAME)`` reaches the policy's ``command`` as ``by`` (so
    its journaled event can name who asked); without it the policy hears None."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=DOMAIN_CODEC)
    policy = Reserving()
    async with open_farm(
        {"n1": CPU4, "n2": CPU4}, clock=clock, journal=journal, policy=policy
    ) as farm:
        await farm.engine.policy_command("reserve", {"node": "n1"}, by="alice")
        await farm.engine.policy_command("reserve", {"node": "n2"})
    assert policy.reserved_by == {"n1": "alice", "n2": None}
    records = await journal.read_stream("policy:reserving")
    assert [(r.event.node, r.event.by) for r in records if isinstance(r.event, Reserved)] == [
        ("n1", "alice"),
        ("n2", None),
    ]


class SleepyFarm(FifoPolicy):
    """Sleeps every idle node beyond one, wakes them all when work waits."""

    def node_actions(self, farm: FarmView, now: datetime) -> Sequence[NodeAction]:
        if any(job.queued for job in farm.jobs.values()):
            return [
                NodeAction(node=name, health="online", reason="work waits")
                for name, view in sorted(farm.nodes.items())
                if view.health == "sleeping"
            ]
        idle = sorted(n for n, v in farm.nodes.items() if v.health == "online" and not v.running)
        return [NodeAction(node=name, health="sleeping", reason="idle") for name in idle[1:]]


async def test_a_policy_sleeps_and_wakes_nodes_but_never_overrides_the_operator() -> None:
    """node_actions put idle nodes to sleep (journaled, by policy) and wake them when work
    waits; a node the operator drained stays drained."""
    async with open_farm({"n1": ONE, "n2": ONE, "n3": ONE}, policy=SleepyFarm()) as farm:
        await farm.engine.set_node_health("n3", "draining", reason="disk swap")
        with anyio.fail_after(WAIT):
            while {n.name: n.health for n in await farm.engine.nodes()}["n2"] != "sleeping":
                await anyio.lowlevel.checkpoint()
        await farm.engine.submit([job("a", "sleep", "60", tasks=2)])
        await farm.wait("a")
        assert {r.node for r in farm.works.of("a")} == {"n1", "n2"}
        health = {n.name: n.health for n in await farm.engine.nodes()}
        assert health["n3"] == "draining"
        events = [r.event for r in await farm.journal.read_stream("node:n2")]
        changes = [(e.health, e.by) for e in events if isinstance(e, NodeHealthChanged)]
        assert ("sleeping", "policy") in changes
        assert ("online", "policy") in changes
