"""Tables for reservations, EASY backfill and maintenance windows, on hand-built farm views."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from actors import (
    FarmView,
    JobView,
    NodeView,
    Priority,
    Resources,
    RunningView,
    SubmitJob,
    TaskSpec,
)
from domains.scientific import MaintenanceWindow, Reservation
from domains.scientific._backfill import (
    HEAD,
    Hold,
    backfill_refusal,
    head_hold,
    plan_reservations,
)
from domains.scientific._maintenance import (
    maintenance_actions,
    maintenance_refusal,
    window_yields,
)

T0 = datetime(2027, 3, 1, tzinfo=UTC)
NODE = Resources.of(cores=32, memory="128GiB")


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def job(
    job_id: str, priority: Priority = Priority.MEDIUM, walltime: float | None = None
) -> JobView:
    spec = SubmitJob(
        job_id=job_id,
        name=job_id,
        priority=priority,
        command=("x",),
        tasks=(TaskSpec(index=0, name="main", max_runtime=walltime),),
        preemptible=True,
        checkpointable=True,
    )
    return JobView(job_id=job_id, spec=spec, submitted_at=T0, total=1)


def farm(
    nodes: dict[str, dict[str, tuple[float, float | None, Priority]]],
    *,
    labels: dict[str, tuple[str, ...]] | None = None,
    health: dict[str, tuple[str, str]] | None = None,
) -> tuple[FarmView, dict[tuple[str, int], float | None]]:
    """Nodes with their running work: node -> {job: (started hours, walltime h, priority)}."""
    views: dict[str, NodeView] = {}
    running: dict[str, dict[tuple[str, int], RunningView]] = {}
    jobs: dict[str, JobView] = {}
    walltime: dict[tuple[str, int], float | None] = {}
    for name, work in nodes.items():
        state, by = (health or {}).get(name, ("online", "engine"))
        views[name] = NodeView(
            name=name,
            capacity=NODE,
            free=NODE if not work else Resources(),
            labels=(labels or {}).get(name, ()),
            health=state,
            health_by=by,
            running=len(work),
        )
        running[name] = {}
        for job_id, (started, hours, priority) in work.items():
            view = jobs.setdefault(job_id, job(job_id, priority, hours * 3600 if hours else None))
            running[name][(job_id, 0)] = RunningView(
                job_id=job_id, task=0, request=NODE, node=name, started_at=at(started), job=view
            )
            walltime[(job_id, 0)] = hours * 3600 if hours is not None else None
    return FarmView(nodes=views, jobs=jobs, running=running, placements={}), walltime


def reservation(
    count: int = 2, start: float = 10.0, hours: float = 24.0, **fields: object
) -> Reservation:
    return Reservation(
        name="big",
        job_id="sim",
        start=at(start),
        duration=hours * 3600,
        count=count,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("count", "held"),
    [
        (1, ("c",)),  # busy until 5 h, free by the start at 10 h: holding it idles nothing
        (2, ("c", "b")),  # the idle node only when it must
        (3, ("c", "b", "a")),  # then the one that frees soonest after the start
        (4, ("c", "b", "a", "d")),  # unknown walltimes last
    ],
)
def test_a_reservation_holds_nodes_free_by_its_start_busy_longest_first(
    count: int, held: tuple[str, ...]
) -> None:
    """Nodes free by the start come first, the one whose work ends latest first (so a node
    idle now is held only when needed), then by when their walltime ends after the start."""
    view, walltime = farm(
        {
            "a": {"j1": (0.0, 20.0, Priority.LOW)},
            "b": {},
            "c": {"j2": (0.0, 5.0, Priority.LOW)},
            "d": {"j3": (0.0, None, Priority.LOW)},
        }
    )
    plan = plan_reservations([reservation(count=count)], view, T0, walltime=walltime)
    assert plan.nodes["big"] == held
    assert plan.short["big"] == 0


def test_a_failed_reserved_node_is_replaced_from_the_free_pool() -> None:
    """When a held node goes offline, the next cycle holds another node instead."""
    view, walltime = farm({"a": {}, "b": {}, "c": {}})
    assert plan_reservations([reservation()], view, T0, walltime=walltime).nodes["big"] == (
        "a",
        "b",
    )
    view.nodes["a"].reachable = "offline"
    assert plan_reservations([reservation()], view, T0, walltime=walltime).nodes["big"] == (
        "b",
        "c",
    )


def test_the_operators_nodes_and_critical_maintenance_are_not_counted_on() -> None:
    """A node drained by the operator, or taken by a critical window during the reservation,
    is not held; one the policy drained for an earlier window is."""
    view, walltime = farm(
        {"a": {}, "b": {}, "c": {}, "d": {}},
        health={"a": ("draining", "operator"), "d": ("draining", "policy")},
    )
    critical = MaintenanceWindow(
        name="fw", start=at(20), end=at(22), severity="critical", nodes=("b",)
    )
    minor = MaintenanceWindow(name="os", start=at(20), end=at(22), severity="minor", nodes=("c",))
    plan = plan_reservations(
        [reservation(count=4)], view, T0, walltime=walltime, windows=[critical, minor]
    )
    assert plan.nodes["big"] == ("c", "d")
    assert plan.short["big"] == 2


def test_requires_alone_holds_every_node_with_the_label() -> None:
    """A reservation by label (no count) holds all the nodes that have it."""
    view, walltime = farm({"a": {}, "b": {}, "g1": {}}, labels={"g1": ("gpu",), "b": ("gpu",)})
    plan = plan_reservations([reservation(count=0, requires="gpu")], view, T0, walltime=walltime)
    assert plan.nodes["big"] == ("b", "g1")


@pytest.mark.parametrize(
    ("job_id", "walltime_h", "now_h", "allowed", "why"),
    [
        ("other", 9.0, 0.0, True, None),  # ends at 9 h, the reservation starts at 10 h
        ("other", 10.0, 0.0, True, None),  # ends exactly at the start
        ("other", 11.0, 0.0, False, "run into big"),
        ("other", None, 0.0, False, "no walltime"),
        ("other", 1.0, 10.0, False, "reserved for sim"),  # started: the nodes are sim's
        ("sim", None, 0.0, True, None),  # its own simulation, any time
        ("sim", 48.0, 11.0, True, None),
    ],
)
def test_backfill_table(
    job_id: str, walltime_h: float | None, now_h: float, allowed: bool, why: str | None
) -> None:
    """Before its start, other work backfills a held node only if its walltime ends by then."""
    view, walltime = farm({"a": {}})
    plan = plan_reservations([reservation(count=1)], view, T0, walltime=walltime)
    seconds = walltime_h * 3600 if walltime_h is not None else None
    refusal = backfill_refusal(job_id, seconds, "a", plan.holds, at(now_h))
    assert (refusal is None) is allowed
    if why is not None:
        assert refusal is not None
        assert why in refusal


def test_backfill_never_delays_a_reservation() -> None:
    """Seeded trials: whatever backfill is allowed onto held nodes, every held node is free
    (by walltime) at the start, so the reservation starts on time."""
    rng = random.Random(7)
    for _ in range(200):
        names = [f"n{k}" for k in range(8)]
        work = {
            name: (
                {
                    f"w{name}": (
                        rng.uniform(-5, 0),
                        rng.choice([None, rng.uniform(1, 30)]),
                        Priority.LOW,
                    )
                }
                if rng.random() < 0.6
                else {}
            )
            for name in names
        }
        view, walltime = farm(work)
        start = rng.uniform(2, 24)
        wanted = rng.randint(1, 8)
        plan = plan_reservations(
            [reservation(count=wanted, start=start)], view, T0, walltime=walltime
        )
        for name in plan.nodes["big"]:
            # what runs there now was there before the reservation (it yields if it overruns);
            # what backfill may add must end by the start
            for _attempt in range(5):
                hours = rng.uniform(0.5, 30)
                if backfill_refusal("bf", hours * 3600, name, plan.holds, T0) is None:
                    assert T0 + timedelta(hours=hours) <= at(start)


def test_the_queue_head_gets_the_node_that_frees_first() -> None:
    """EASY's own reservation: the waiting stage that fits nowhere holds the soonest node."""
    view, walltime = farm(
        {
            "a": {"j1": (0.0, 20.0, Priority.LOW)},
            "b": {"j2": (0.0, 6.0, Priority.LOW)},
            "c": {"j3": (0.0, None, Priority.LOW)},
        }
    )
    for name in view.nodes:
        view.nodes[name].accepts_work  # noqa: B018 (all online)
    found = head_hold("head", NODE, (), view, walltime, T0, {})
    assert found is not None
    node, hold = found
    assert (node, hold.start) == ("b", at(6))
    assert backfill_refusal("small", 5 * 3600, "b", {node: hold}, T0) is None
    assert backfill_refusal("small", 7 * 3600, "b", {node: hold}, T0) is not None


@pytest.mark.parametrize(
    ("now_h", "walltime_h", "yields", "allowed"),
    [
        (0.0, 20.0, (900.0, 3600.0), True),  # yields at 9:45, after 9 h 45 of work
        (8.75, 20.0, (900.0, 3600.0), True),  # exactly the minimum runtime before the lead
        (9.0, 20.0, (900.0, 3600.0), False),  # less than the minimum runtime left
        (0.0, None, (900.0, 3600.0), True),  # no walltime: it yields all the same
        (0.0, 20.0, None, False),  # cannot checkpoint or be preempted: walltime only
        (10.0, 1.0, (900.0, 3600.0), False),  # from the start the node is the simulation's
    ],
)
def test_preemptible_backfill_table(
    now_h: float, walltime_h: float | None, yields: tuple[float, float] | None, allowed: bool
) -> None:
    """A stage that can checkpoint and yield may use a reserved node past the start if it
    gets its minimum runtime before the lead; others only if their walltime ends before it."""
    hold = Hold("big", "sim", at(10), at(34))
    walltime = walltime_h * 3600 if walltime_h is not None else None
    refusal = backfill_refusal("x", walltime, "a", {"a": hold}, at(now_h), yields=yields)
    assert (refusal is None) is allowed, refusal


def test_the_queue_heads_hold_is_never_backfilled_preemptibly() -> None:
    """The queue head's own hold admits only work that ends before it frees."""
    hold = Hold(HEAD, "head", at(6), None)
    assert backfill_refusal("x", 7 * 3600, "b", {"b": hold}, T0, yields=(900.0, 3600.0))


# -- maintenance --------------------------------------------------------------------------------


def window(
    severity: str = "major", start: float = 10.0, end: float = 14.0, **fields: object
) -> MaintenanceWindow:
    return MaintenanceWindow(
        name="w",
        start=at(start),
        end=at(end),
        severity=severity,  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("severity", "now", "node_health", "drain_at", "expected"),
    [
        ("major", 0.0, ("online", "engine"), None, ("online", 10.0)),  # plan the drain
        ("major", 0.0, ("online", "policy"), 10.0, None),  # planned already
        ("critical", 11.0, ("online", "engine"), None, ("draining", None)),  # begun: drain now
        ("major", 15.0, ("draining", "policy"), None, ("online", None)),  # over: come back
        ("major", 15.0, ("draining", "operator"), None, None),  # the operator's: untouched
        ("major", 0.0, ("quarantined", "engine"), None, None),
        ("minor", 0.0, ("online", "engine"), None, None),  # minor windows drain nothing
    ],
)
def test_maintenance_actions_table(
    severity: str,
    now: float,
    node_health: tuple[str, str],
    drain_at: float | None,
    expected: tuple[str, float | None] | None,
) -> None:
    """Nodes drain at a window's start (planned ahead), come back after it, and the
    operator's decisions are never overridden."""
    view, _ = farm({"a": {}}, health={"a": node_health})
    view.nodes["a"].drain_at = at(drain_at) if drain_at is not None else None
    actions = maintenance_actions([window(severity)], view, at(now))
    if expected is None:
        assert actions == []
    else:
        health, when = expected
        assert [(a.health, a.at) for a in actions] == [
            (health, at(when) if when is not None else None)
        ]


def test_a_major_window_spares_reserved_nodes_a_critical_one_does_not() -> None:
    """Reservations win over major maintenance; critical maintenance wins over reservations."""
    view, _ = farm({"a": {}, "b": {}})
    major = maintenance_actions([window("major")], view, T0, reserved={"a"})
    assert [a.node for a in major] == ["b"]
    critical = maintenance_actions([window("critical")], view, T0, reserved={"a"})
    assert [a.node for a in critical] == ["a", "b"]


@pytest.mark.parametrize(
    ("priority", "walltime", "now", "refused"),
    [
        (Priority.BACKGROUND, 5.0, 0.0, False),  # ends before the minor window
        (Priority.BACKGROUND, 12.0, 0.0, True),
        (Priority.BACKGROUND, None, 0.0, True),
        (Priority.LOW, 12.0, 0.0, False),  # minor windows move only background work
        (Priority.BACKGROUND, 1.0, 15.0, False),  # after it
    ],
)
def test_minor_windows_keep_background_work_off(
    priority: Priority, walltime: float | None, now: float, refused: bool
) -> None:
    """Background work that would meet a minor window is not placed on its nodes."""
    view, _ = farm({"a": {}})
    seconds = walltime * 3600 if walltime is not None else None
    found = maintenance_refusal([window("minor")], view.nodes["a"], priority, seconds, at(now))
    assert (found is not None) is refused


def test_at_a_windows_start_what_runs_there_yields() -> None:
    """In a minor window only background work yields; in a major one everything, except
    on nodes a reservation holds."""
    view, _ = farm(
        {
            "a": {"bg": (0.0, 20.0, Priority.BACKGROUND)},
            "b": {"hi": (0.0, 20.0, Priority.HIGH)},
            "c": {"lo": (0.0, 20.0, Priority.LOW)},
        }
    )
    minor = window_yields([window("minor")], view, at(11))
    assert [(p.victim_job, p.node) for p in minor] == [("bg", "a")]
    major = window_yields([window("major")], view, at(11), reserved={"c"})
    assert [(p.victim_job, p.node) for p in major] == [("bg", "a"), ("hi", "b")]
    assert window_yields([window("major")], view, at(9)) == []


def test_a_started_reservation_counts_every_node_of_its_multi_node_stage() -> None:
    """Once its simulation runs a two-node stage, a two-node reservation holds those two
    nodes (not an idle one beside them), though the placement names only the leader."""
    view, walltime = farm(
        {
            "a": {"sim": (-1.0, 30.0, Priority.HIGH)},
            "b": {"sim": (-1.0, 30.0, Priority.HIGH)},
            "c": {},
        }
    )
    view = dataclasses.replace(view, placements={"sim": {0: "a"}})
    plan = plan_reservations([reservation(start=-1.0)], view, T0, walltime=walltime)
    assert plan.nodes["big"] == ("a", "b")
    assert "big" in plan.active


@pytest.mark.parametrize(
    ("second_start", "second_nodes", "short"),
    [
        (34.0, ("a",), 0),  # starts when the first ends: the same node serves both
        (40.0, ("a",), 0),  # later still
        (30.0, (), 1),  # overlaps the first: no node left for it
    ],
)
def test_a_node_serves_reservations_one_after_another(
    second_start: float, second_nodes: tuple[str, ...], short: int
) -> None:
    """One node, two reservations: back to back they share it (the node's next hold is the
    earlier one); overlapping, the later one is short of a node."""
    view, walltime = farm({"a": {}})
    first = reservation(count=1, start=10.0, hours=24.0)
    second = msgspec.structs.replace(
        reservation(count=1, start=second_start, hours=6.0), name="after", job_id="sim2"
    )
    plan = plan_reservations([second, first], view, T0, walltime=walltime)
    assert plan.nodes["big"] == ("a",)
    assert plan.nodes["after"] == second_nodes
    assert plan.short["after"] == short
    assert plan.holds["a"].name == "big"
