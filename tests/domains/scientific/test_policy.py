"""The science policy in the production engine, on a virtual clock with simulated stages:
reservations and backfill, maintenance, protected preemption, checkpoint intervals,
recovery, sweeps with successive halving, fair share, and restarts that replay it all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest

from actors import (
    ENGINE_CODEC,
    AttemptOutcome,
    AttemptSpec,
    Engine,
    EngineSettings,
    JobSubmittedObservation,
    JobView,
    Priority,
    Resources,
    TaskCheckpointed,
    TaskCheckpointRequested,
    TaskEndedObservation,
    TaskPreempted,
    TaskStarted,
    TaskStartedObservation,
    TaskView,
    open_engine,
    open_simulated_executor,
    simulated_work,
)
from domains.scientific import (
    SCIENCE_CODEC,
    MaintenanceCancelled,
    MaintenanceScheduled,
    MaintenanceWindow,
    MemberPinned,
    Reservation,
    ReservationCancelled,
    ReservationMade,
    SciencePolicy,
    Simulation,
    SimulationStage,
    parameter_sweep,
    parse_cluster_config,
)
from domains.scientific._checkpointing import checkpoint_interval
from domains.scientific._cli import _text as render_reply
from persistence import EventCodec, InMemoryJournal
from runtime import VirtualClock

T0 = datetime(2027, 3, 1, tzinfo=UTC)
NODE = Resources.of(cores=32, memory="64GiB")
WAIT = 20.0
H = 3600.0


def codec() -> EventCodec:
    merged = EventCodec()
    merged.update(ENGINE_CODEC)
    merged.update(SCIENCE_CODEC)
    return merged


@dataclass
class Cluster:
    engine: Engine
    journal: InMemoryJournal
    clock: VirtualClock
    policy: SciencePolicy

    async def starts(self, job_id: str) -> list[tuple[float, str]]:
        """Return (hours since T0, node) of every attempt start of the job."""
        found = []
        nodes: dict[int, str] = {}
        for record in await self.journal.read_stream(f"job:{job_id}"):
            event = record.event
            if type(event).__name__ == "TaskAssigned":
                nodes[event.task] = event.node  # type: ignore[attr-defined]
            if isinstance(event, TaskStarted):
                # ``at``: when it started (the event is journaled with the job's next commit).
                began = event.at or record.timestamp
                found.append(((began - T0).total_seconds() / H, nodes[event.task]))
        return found

    async def events(self, job_id: str, kind: type) -> list[object]:
        return [
            r.event
            for r in await self.journal.read_stream(f"job:{job_id}")
            if isinstance(r.event, kind)
        ]

    async def until(self, hours: float) -> None:
        await self.clock.sleep((T0 + timedelta(hours=hours) - self.clock.now()).total_seconds())


def work(spec: AttemptSpec) -> float:
    return float(spec.env.get("WORK", "3600")) - simulated_work(spec.resume_from)


@asynccontextmanager
async def cluster(
    nodes: int = 3,
    config: str = "",
    *,
    journal: InMemoryJournal | None = None,
    clock: VirtualClock | None = None,
    outcome: Mapping[str, AttemptOutcome] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> AsyncIterator[Cluster]:
    clock = clock or VirtualClock(auto_advance=True, start=T0)
    journal = journal or InMemoryJournal(clock=clock, codec=codec())
    policy = SciencePolicy(parse_cluster_config(config))
    failing = dict(outcome or {})
    scores = dict(metrics or {})
    async with (
        open_simulated_executor(
            duration=work,
            clock=clock,
            outcome=lambda spec: failing.get(spec.job_id, "completed"),
            metrics=lambda spec: {"accuracy": scores[spec.job_id]} if spec.job_id in scores else {},
        ) as executor,
        open_engine(
            journal=journal,
            clock=clock,
            policy=policy,
            settings=EngineSettings(preempt_grace=600.0),
        ) as engine,
    ):
        for k in range(nodes):
            await engine.add_node(f"n{k}", NODE, executor=executor)
        yield Cluster(engine=engine, journal=journal, clock=clock, policy=policy)


def sim(
    name: str,
    hours: float,
    *,
    walltime: float | None = None,
    nodes: int = 1,
    priority: Priority = Priority.MEDIUM,
    owner: str = "ana",
    project: str = "climate",
    **fields: object,
) -> Simulation:
    return Simulation(
        name=name,
        owner=owner,
        project=project,
        priority=priority,
        stages=[
            SimulationStage(
                name="main",
                command=["model"],
                cores=32,
                nodes=nodes,
                walltime=walltime * H if walltime else None,
                env={"WORK": str(hours * H)},
            )
        ],
        **fields,  # type: ignore[arg-type]
    )


async def test_a_reservation_is_journaled_listed_and_replayed_after_a_restart() -> None:
    """``reserve`` is a journaled policy command; a restarted engine still holds it."""
    clock = VirtualClock(auto_advance=True, start=T0)
    journal = InMemoryJournal(clock=clock, codec=codec())
    start = (T0 + timedelta(hours=10)).isoformat()
    async with cluster(journal=journal, clock=clock) as farm:
        reply = await farm.engine.policy_command(
            "reserve", {"for": "big", "start": start, "duration": "1d", "nodes": 2, "name": "r1"}
        )
        assert reply["nodes"] == ["n0", "n1"]
    async with cluster(journal=journal, clock=clock) as farm:
        rows = await farm.engine.policy_command("reservations", {})
        assert [(r["name"], r["status"], r["count"]) for r in rows] == [("r1", "planned", 2)]
        cancelled = await farm.engine.policy_command("unreserve", {"name": "r1"})
        assert cancelled == {"cancelled": "r1"}
        assert await farm.engine.policy_command("reservations", {}) == []


WHO_CONFIG = """
[[reservations]]
name = "from-file"
for = "other"
start = 2027-03-05T00:00:00Z
duration = "1h"
nodes = 1
[[maintenance]]
name = "file-window"
start = 2027-03-06T00:00:00Z
end = 2027-03-06T01:00:00Z
"""


async def test_windows_and_reservations_tables_keep_their_columns_when_a_cell_is_blank() -> None:
    """A window without a reason (or nodes) and a reservation without a label render "-" in
    those cells, so every row splits into the header's columns, each under its name."""
    window = {
        "start": (T0 + timedelta(days=2)).isoformat(),
        "end": (T0 + timedelta(days=2, hours=1)).isoformat(),
    }
    async with cluster() as farm:
        command = farm.engine.policy_command
        await command("maintenance", {"name": "quiet", **window})
        await command("maintenance", {"name": "fw", "reason": "firmware", **window}, by="bob")
        start = (T0 + timedelta(hours=10)).isoformat()
        await command("reserve", {"for": "big", "start": start, "duration": "1h", "nodes": 1})
        tables = [render_reply(await command(name, {})) for name in ("windows", "reservations")]
    for table in tables:
        header, *rows = table.splitlines()
        assert rows
        for row in rows:
            assert len(row.split()) == len(header.split()), row
    windows = tables[0].splitlines()
    quiet = next(row for row in windows if row.startswith("quiet"))
    assert quiet[windows[0].index("reason") :].split()[0] == "-"


async def test_every_science_command_records_who_asked_and_a_restart_keeps_it() -> None:
    """``policy_command(..., by=NAME)`` puts NAME on the reservation, window, cancellation
    and pin it journals, and ``reservations``/``windows`` show it, after a restart too; an
    ``arguments["by"]`` is the caller's word and ignored; without ``by`` nothing is claimed
    (null); cluster.toml's entries say so."""
    clock = VirtualClock(auto_advance=True, start=T0)
    journal = InMemoryJournal(clock=clock, codec=codec())
    start = (T0 + timedelta(hours=10)).isoformat()
    window = {
        "start": (T0 + timedelta(days=2)).isoformat(),
        "end": (T0 + timedelta(days=2, hours=1)).isoformat(),
    }
    async with cluster(journal=journal, clock=clock, config=WHO_CONFIG) as farm:
        command = farm.engine.policy_command
        reply = await command(
            "reserve",
            {"for": "big", "start": start, "duration": "1d", "nodes": 1, "name": "r1", "by": "eve"},
            by="alice",
        )
        assert reply["by"] == "alice"
        await command("reserve", {"for": "big", "start": start, "duration": "1h", "nodes": 1})
        made = await command("maintenance", {"name": "fw", **window}, by="bob")
        assert made["by"] == "bob"
        await command("maintenance", {"name": "quiet", **window})
        rows = await command("reservations", {})
        assert {r["name"]: r["by"] for r in rows if r["for"] == "big"} == {
            "r1": "alice",
            "big@20270301T1000": None,
        }
        assert [w["by"] for w in await command("windows", {}) if w["name"] == "quiet"] == [None]
        await farm.engine.submit([sim("s1", 1).to_job()])
        await command("pin", {"job": "s1"}, by="carol")
        await command("unreserve", {"name": "big@20270301T1000"}, by="dan")
        await command("cancel-maintenance", {"name": "quiet"}, by="dan")
    expected_rows = (
        [("r1", "alice"), ("from-file", "cluster.toml")],
        [("fw", "bob"), ("file-window", "cluster.toml")],
    )
    async with cluster(journal=journal, clock=clock, config=WHO_CONFIG) as farm:
        reservations = await farm.engine.policy_command("reservations", {})
        windows = await farm.engine.policy_command("windows", {})
        assert (
            [(r["name"], r["by"]) for r in reservations],
            [(w["name"], w["by"]) for w in windows],
        ) == expected_rows
    events = [r.event for r in await journal.read_stream("policy:science")]
    who = []
    for event in events:
        match event:
            case ReservationMade(reservation=made):
                who.append(("reserved", made.name, made.by))
            case MaintenanceScheduled(window=scheduled):
                who.append(("scheduled", scheduled.name, scheduled.by))
            case MemberPinned(job_id=job_id, by=by):
                who.append(("pinned", job_id, by))
            case ReservationCancelled(name=name, by=by) | MaintenanceCancelled(name=name, by=by):
                who.append(("cancelled", name, by))
    assert who == [
        ("reserved", "r1", "alice"),
        ("reserved", "big@20270301T1000", ""),
        ("scheduled", "fw", "bob"),
        ("scheduled", "quiet", ""),
        ("pinned", "s1", "carol"),
        ("cancelled", "big@20270301T1000", "dan"),
        ("cancelled", "quiet", "dan"),
    ]


def test_science_events_journaled_before_by_was_recorded_still_decode() -> None:
    """A reservation, window, cancellation or pin stored without ``by`` (an older journal)
    decodes, with ``by`` empty (no one named)."""
    at = T0 + timedelta(hours=1)

    def reservation(by: str) -> ReservationMade:
        return ReservationMade(
            reservation=Reservation(name="r", job_id="j", start=at, duration=60.0, by=by)
        )

    def window(by: str) -> MaintenanceScheduled:
        return MaintenanceScheduled(window=MaintenanceWindow(name="w", start=at, end=at, by=by))

    kinds = [
        (reservation, "reservation"),
        (window, "window"),
        (lambda by: ReservationCancelled(name="r", by=by), None),
        (lambda by: MaintenanceCancelled(name="w", by=by), None),
        (lambda by: MemberPinned(job_id="j", by=by), None),
    ]
    for make, inner in kinds:
        stored = SCIENCE_CODEC.encode(make("alice"))
        payload = msgspec.json.decode(stored.payload)
        del (payload[inner] if inner else payload)["by"]
        old = SCIENCE_CODEC.decode(stored.tag, stored.schema_version, msgspec.json.encode(payload))
        assert old == make(""), stored.tag


async def test_backfill_fills_the_gap_and_the_reservation_starts_on_time() -> None:
    """Short work runs on the held nodes until the start; long work that cannot yield stays
    off them; the reserved two-node simulation starts at its start, on its nodes."""
    async with cluster(3) as farm:
        start = T0 + timedelta(hours=10)
        await farm.engine.policy_command(
            "reserve", {"for": "big", "start": start.isoformat(), "duration": "1d", "nodes": 2}
        )
        await farm.engine.submit(
            [
                sim("long-a", 18, walltime=20, preemptible=False).to_job(),
                sim("long-b", 18, walltime=20, preemptible=False).to_job(),
                sim("short-a", 3, walltime=4).to_job(),
                sim("short-b", 3, walltime=4).to_job(),
            ]
        )
        await farm.until(1)
        why = await farm.engine.why("long-b")
        assert "run into" in why
        assert "points" in why
        await farm.until(9)
        await farm.engine.submit([sim("big", 5, walltime=8, nodes=2).to_job()])
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("big")
        big = await farm.starts("big")
        assert big[0][0] <= 10.0 + 0.5  # on time (within a cycle of its start)
        assert farm.policy.reservations["big@20270301T1000"].job_id == "big"
        for name in ("short-a", "short-b"):
            assert (await farm.starts(name))[0][0] == 0.0  # backfilled at once
        first_long = min(s[0] for s in await farm.starts("long-a") + await farm.starts("long-b"))
        assert first_long == 0.0
        long_nodes = {
            s[1] for s in await farm.starts("long-a") + await farm.starts("long-b") if s[0] < 10
        }
        assert len(long_nodes) == 1  # only the node the reservation does not hold


@pytest.mark.parametrize(
    ("preemptible", "on_reserved_nodes"), [(True, True), (False, False)], ids=["yields", "cannot"]
)
async def test_long_preemptible_work_backfills_and_yields_before_the_start(
    preemptible: bool, on_reserved_nodes: bool
) -> None:
    """A checkpointable, preemptible stage longer than the gap runs on the reserved nodes
    anyway, checkpoints and yields 15 minutes before the start (resuming later from its
    checkpoint, with no budget spent), and the reservation starts on time; one that cannot
    yield stays off them."""
    async with cluster(2) as farm:
        start = T0 + timedelta(hours=10)
        await farm.engine.policy_command(
            "reserve", {"for": "big", "start": start.isoformat(), "duration": "1d", "nodes": 2}
        )
        await farm.engine.submit([sim("long", 18, walltime=20, preemptible=preemptible).to_job()])
        await farm.until(9)
        await farm.engine.submit([sim("big", 5, walltime=8, nodes=2).to_job()])
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("big")
            await farm.engine.wait_job("long")
        big = await farm.starts("big")
        assert big[0][0] <= 10.0
        long = await farm.starts("long")
        assert (long[0][0] < 9.0) is on_reserved_nodes  # both nodes are reserved
        if on_reserved_nodes:
            (yielded,) = await farm.events("long", TaskPreempted)
            assert "reservation big@20270301T1000 for big starts at" in yielded.reason  # type: ignore[attr-defined]
            assert len(long) == 2
            assert long[1][0] >= big[0][0] + 5.0  # after big
            assert await farm.events("long", TaskCheckpointed)  # it resumed from its checkpoint
            assert not farm.policy.preempted.times.get("long")  # no budget spent
        else:
            assert long[0][0] >= big[0][0] + 5.0  # only once the reservation's work is done


async def test_a_multi_node_stage_submitted_after_its_start_gets_every_node_freed() -> None:
    """The reserved simulation arrives after its reservation started, as one three-node stage:
    the work on all three held nodes checkpoints and yields (not only on the first), and the
    stage starts within the preemption grace."""
    async with cluster(3) as farm:
        start = T0 + timedelta(hours=10)
        await farm.engine.policy_command(
            "reserve", {"for": "big", "start": start.isoformat(), "duration": "1d", "nodes": 3}
        )
        await farm.engine.submit([sim(f"long-{k}", 18, walltime=20).to_job() for k in range(3)])
        await farm.until(11)
        await farm.engine.submit([sim("big", 2, walltime=4, nodes=3).to_job()])
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("big")
        big = await farm.starts("big")
        assert big[0][0] <= 11.0 + 0.25  # within the 10-minute grace of its arrival
        for k in range(3):
            (yielded,) = await farm.events(f"long-{k}", TaskPreempted)
            assert "reservation big@20270301T1000 for big started at" in yielded.reason  # type: ignore[attr-defined]


async def test_a_major_window_drains_before_and_brings_the_nodes_back_after() -> None:
    """Work that cannot finish before the window stays off its node; what runs there at the
    start checkpoints, yields and resumes elsewhere; the node returns after the window."""
    async with cluster(2) as farm:
        await farm.engine.policy_command(
            "maintenance",
            {
                "name": "fw",
                "start": (T0 + timedelta(hours=2)).isoformat(),
                "end": (T0 + timedelta(hours=4)).isoformat(),
                "severity": "major",
                "nodes": ["n0"],
            },
        )
        await farm.engine.submit([sim("walltimed", 3, walltime=3.5).to_job()])
        await farm.until(0.5)
        await farm.engine.submit([sim("open", 6).to_job()])  # no walltime: lands on n0
        await farm.until(2.5)
        nodes = {n.name: n.health for n in await farm.engine.nodes()}
        assert nodes["n0"] == "draining"
        assert (await farm.starts("walltimed"))[0][1] == "n1"
        preempted = await farm.events("open", TaskPreempted)
        assert [p.reason for p in preempted] != []  # type: ignore[attr-defined]
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("open")
            await farm.engine.wait_job("walltimed")
        await farm.until(4.5)
        nodes = {n.name: n.health for n in await farm.engine.nodes()}
        assert nodes["n0"] == "online"
        opened = await farm.starts("open")
        assert [s[1] for s in opened][:1] == ["n0"]


async def test_a_waiting_high_stage_preempts_only_after_the_minimum_runtime() -> None:
    """A high simulation waits until the low one ran an hour, then the low one checkpoints
    and yields, and resumes from its checkpoint once the node is free."""
    async with cluster(1) as farm:
        await farm.engine.submit([sim("low", 4, priority=Priority.LOW).to_job()])
        await farm.until(0.25)
        await farm.engine.submit([sim("high", 1, priority=Priority.HIGH).to_job()])
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("high")
            await farm.engine.wait_job("low")
        preempted = await farm.events("low", TaskPreempted)
        assert len(preempted) == 1
        high = await farm.starts("high")
        assert 1.0 <= high[0][0] <= 1.6  # after the minimum runtime (and the checkpoint)
        assert "needs node" in preempted[0].reason  # type: ignore[attr-defined]
        low = await farm.starts("low")
        assert len(low) == 2


async def test_the_checkpoint_interval_follows_the_resilience_level() -> None:
    """A high-resilience stage without a known checkpoint cost is asked every 30 minutes."""
    async with cluster(1) as farm:
        await farm.engine.submit([sim("careful", 2, resilience="high").to_job()])
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("careful")
        requests = await farm.events("careful", TaskCheckpointRequested)
        assert len(requests) == 3  # at 30, 60 and 90 minutes
        assert "careful" in farm.policy.intervals
        assert farm.policy.intervals["careful"].seconds == 1800


def test_a_stage_is_costed_by_its_latest_checkpoint_manifest() -> None:
    """The interval the policy gives a stage follows the size of its last verified checkpoint
    (TaskView.checkpoint_bytes) over the configured bandwidth, ahead of a reported
    checkpoint_seconds and of the configured checkpoint_size."""
    policy = SciencePolicy(parse_cluster_config('[checkpoints]\nbandwidth = "100MiB"'))
    spec = sim("big", 10, checkpoint_size="1GiB").to_job()
    job = JobView(job_id=spec.job_id, spec=spec, submitted_at=T0, total=1)
    policy.checkpoint_cost[spec.job_id] = 5.0  # a checkpoint_seconds it reported

    def interval(checkpoint_bytes: int) -> tuple[float, str]:
        task = TaskView(
            job_id=spec.job_id, index=0, request=NODE, checkpoint_bytes=checkpoint_bytes
        )
        seconds = policy.checkpoint_interval(job, task, T0)
        assert seconds is not None
        return seconds, policy.intervals[spec.job_id].why

    settings = policy.config.checkpoints
    mtbf = policy.mtbf()
    big, why = interval(50 * 1024**3)  # 50 GiB at 100 MiB/s: 512 s
    assert big == checkpoint_interval("medium", 512.0, mtbf, settings).seconds
    assert "50.0 GiB by its last checkpoint's manifest at 100.0 MiB/s" in why
    assert why == policy.describe(job, T0)["checkpoints"]  # what `taskfarm why` shows
    small, why = interval(0)  # no manifest yet: the reported 5 s
    assert small == checkpoint_interval("medium", 5.0, mtbf, settings).seconds
    assert "a reported checkpoint_seconds" in why
    assert big > small
    del policy.checkpoint_cost[spec.job_id]
    configured, why = interval(0)  # 1 GiB at 100 MiB/s: 10.24 s
    assert configured == checkpoint_interval("medium", 10.24, mtbf, settings).seconds
    assert "checkpoint_size 1.0 GiB" in why


def test_a_multi_node_stage_checkpoints_more_often_by_its_width() -> None:
    """The failure rate is measured per node: a stage on 4 nodes is interrupted whenever any
    of them fails, so its interval is the optimum for a quarter of the per-node MTBF."""
    config = '[checkpoints]\nbandwidth = "100MiB"\nexpected_mtbf = "2d"'
    policy = SciencePolicy(parse_cluster_config(config))
    spec = sim("wide", 10, checkpoint_size="10GiB").to_job()
    job = JobView(job_id=spec.job_id, spec=spec, submitted_at=T0, total=1)
    settings = policy.config.checkpoints

    def interval(nodes: int) -> float:
        task = TaskView(job_id=spec.job_id, index=0, request=NODE, nodes=nodes)
        seconds = policy.checkpoint_interval(job, task, T0)
        assert seconds is not None
        return seconds

    cost = 10 * 1024 / 100  # 10 GiB at 100 MiB/s
    assert policy.mtbf(4) == policy.mtbf() / 4 == 2 * 86400 / 4
    assert interval(1) == checkpoint_interval("medium", cost, 2 * 86400, settings).seconds
    assert interval(4) == checkpoint_interval("medium", cost, 2 * 86400 / 4, settings).seconds
    assert interval(4) < interval(1)


def test_the_measured_mtbf_counts_node_hours_and_lost_attempts() -> None:
    """A 4-node stage that runs 10 hours and loses a node adds 40 node-hours and one
    interruption: with a 30-day prior the per-node MTBF is (30 d + 40 h) / 2."""
    policy = SciencePolicy(parse_cluster_config(""))
    spec = sim("wide", 10, nodes=4).to_job()
    later = T0 + timedelta(hours=10)
    policy.observe(JobSubmittedObservation(job_id=spec.job_id, spec=spec, at=T0))
    policy.observe(TaskStartedObservation(job_id="wide", task=0, node="n1", attempt=1, at=T0))
    lost = TaskEndedObservation(
        job_id="wide", task=0, node="n1", attempt=1, outcome="lost", runtime_s=36000, at=later
    )
    policy.observe(lost)
    assert policy.mtbf() == (30 * 86400 + 4 * 36000) / 2
    assert policy.mtbf(4) == policy.mtbf() / 4


def test_fair_share_charges_a_multi_node_stage_for_every_node() -> None:
    """An hour of a 4-node stage of 32 cores a node costs its owner and project 128
    core-hours, four times an hour of a one-node stage."""
    policy = SciencePolicy(parse_cluster_config(""))
    later = T0 + timedelta(hours=1)
    for name, nodes in (("wide", 4), ("narrow", 1)):
        spec = sim(name, 1, nodes=nodes, owner=name, project=name).to_job()
        policy.observe(JobSubmittedObservation(job_id=spec.job_id, spec=spec, at=T0))
        policy.observe(TaskStartedObservation(job_id=name, task=0, node="n1", attempt=1, at=T0))
    owners, projects = policy.usage.usage(later)  # while they run
    assert owners == projects == {"wide": 4 * 32 * 3600.0, "narrow": 32 * 3600.0}
    for name in ("wide", "narrow"):
        ended = TaskEndedObservation(
            job_id=name, task=0, node="n1", attempt=1, outcome="completed", runtime_s=3600, at=later
        )
        policy.observe(ended)
    owners, _ = policy.usage.usage(later)  # once charged
    assert owners == {"wide": 4 * 32 * 3600.0, "narrow": 32 * 3600.0}


async def test_a_crashing_stage_is_restarted_elsewhere_then_held_for_an_operator() -> None:
    """crash: restart elsewhere after 5 min, then restart after 10 min, then hold."""
    async with cluster(2, outcome={"bad": "failed"}) as farm:
        await farm.engine.submit([sim("bad", 0.5).to_job()])
        await farm.until(3)
        starts = await farm.starts("bad")
        assert [round(s[0] * 60) for s in starts] == [0, 35, 75]
        assert starts[0][1] != starts[1][1]
        why = await farm.engine.why("bad")
        assert "held" in why
        assert "operator" in why


async def test_a_sweep_runs_at_its_cap_and_halving_keeps_the_best() -> None:
    """Nine members, at most three at once; after the first rung the best third goes on,
    after the second the best one; pruned members wait, pinning one resumes it."""
    config = "[scenarios]\nrungs = [0.33, 0.66]\nweights = { accuracy = 1 }"
    quality = {f"mix-{k}": 0.1 * k for k in range(9)}
    async with cluster(4, config, metrics=quality) as farm:
        sweep = parameter_sweep(
            "mix",
            {"k": list(range(9))},
            lambda p: [
                SimulationStage(
                    name=f"r{r}",
                    command=["model"],
                    cores=32,
                    after=[f"r{r - 1}"] if r else [],
                    env={"WORK": str(H)},
                )
                for r in range(3)
            ],
            max_concurrent=3,
            owner="bo",
            project="mix",
        )
        await farm.engine.submit(list(sweep.to_jobs()))
        await farm.until(0.5)
        running = sum(1 for n in await farm.engine.nodes() if n.running)
        assert running == 3
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("mix-8")
        rows = await farm.engine.policy_command("scenarios", {})
        statuses = {m["member"]: m["status"] for m in rows[0]["members"]}
        assert statuses["mix-8"] == "done"
        assert sorted(j for j, s in statuses.items() if s == "pruned") == [
            f"mix-{k}" for k in range(8)
        ]
        assert "pruned at rung 2" in await farm.engine.why("mix-7")
        assert "pruned at rung 1" in await farm.engine.why("mix-0")
        await farm.engine.policy_command("pin", {"job": "mix-7"})
        with anyio.fail_after(WAIT):
            assert (await farm.engine.wait_job("mix-7")).status == "completed"


async def test_fair_share_serves_the_light_user_before_the_heavy_one() -> None:
    """Same priority, the heavy user submitted first: the light user's stage goes first."""
    async with cluster(1) as farm:
        await farm.engine.submit([sim("heavy-1", 10, owner="heavy", project="p1").to_job()])
        await farm.until(9)
        await farm.engine.submit(
            [
                sim("heavy-2", 1, owner="heavy", project="p1").to_job(),
                sim("light-1", 1, owner="light", project="p2").to_job(),
            ]
        )
        with anyio.fail_after(WAIT):
            await farm.engine.wait_job("heavy-2")
        light = (await farm.starts("light-1"))[0][0]
        heavy = (await farm.starts("heavy-2"))[0][0]
        assert light < heavy
