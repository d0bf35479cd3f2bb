"""The dependency graph: readiness, conditions, element-wise edges, cycles, failure
propagation, progress thresholds, passivation and deterministic rebuilds."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from actors import (
    Condition,
    Dependency,
    DependencyCycleError,
    DependencyError,
    DependencyGraph,
    ElementMap,
    GraphJob,
    Outcome,
    TaskRef,
    UnknownDependencyError,
)

S, F, C = Outcome.SUCCEEDED, Outcome.FAILED, Outcome.CANCELLED


def chunks(first: int, last: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size - 1, last)) for s in range(first, last + 1, size)]


@pytest.mark.parametrize(
    ("condition", "outcome", "ready"),
    [
        (Condition.ON_SUCCESS, S, True),
        (Condition.ON_SUCCESS, F, False),
        (Condition.ON_SUCCESS, C, False),
        (Condition.ON_FAILURE, F, True),
        (Condition.ON_FAILURE, S, False),
        (Condition.ON_FAILURE, C, False),
        (Condition.ON_ANY_OUTCOME, S, True),
        (Condition.ON_ANY_OUTCOME, F, True),
        (Condition.ON_ANY_OUTCOME, C, True),
    ],
)
def test_job_condition_table(condition: Condition, outcome: Outcome, ready: bool) -> None:
    """A job-level edge is satisfied or unreachable according to its condition."""
    g = DependencyGraph()
    g.add_job("a", tasks=2)
    g.add_job("b", dependencies=[Dependency(parent="a", condition=condition)])
    assert not g.is_ready(TaskRef("b", 0))
    g.record_outcome(TaskRef("a", 0), S if outcome is S else outcome)
    if outcome is S:
        g.record_outcome(TaskRef("a", 1), S)
    update = g.record_outcome("a", outcome)
    assert g.is_ready(TaskRef("b", 0)) is ready
    assert (TaskRef("b", 0) in update.newly_ready) is ready
    assert (TaskRef("b", 0) in update.newly_unreachable) is not ready
    assert (g.unreachable("b") is None) is ready


@pytest.mark.parametrize(
    ("condition", "outcome", "ready"),
    [
        (Condition.ON_SUCCESS, S, True),
        (Condition.ON_SUCCESS, F, False),
        (Condition.ON_FAILURE, F, True),
        (Condition.ON_ANY_OUTCOME, C, True),
    ],
)
def test_task_condition_table(condition: Condition, outcome: Outcome, ready: bool) -> None:
    """A task-on-task edge follows the parent task's outcome, not its job's."""
    g = DependencyGraph()
    g.add_job("a", tasks=3)
    g.add_job(
        "b",
        tasks=2,
        dependencies=[Dependency(parent="a", parent_task=1, child_task=0, condition=condition)],
    )
    assert g.ready_tasks() == (*(TaskRef("a", i) for i in range(3)), TaskRef("b", 1))
    g.record_outcome(TaskRef("a", 1), outcome)
    assert g.is_ready(TaskRef("b", 0)) is ready


def test_tasks_of_a_job_chain_within_the_job() -> None:
    """Stages as tasks: each waits on the previous one inside the same job."""
    g = DependencyGraph()
    g.add_job(
        "sim",
        tasks=3,
        dependencies=[
            Dependency(parent="sim", parent_task=0, child_task=1),
            Dependency(parent="sim", parent_task=1, child_task=2),
        ],
    )
    assert g.ready_tasks() == (TaskRef("sim", 0),)
    assert g.record_outcome(TaskRef("sim", 0), S).newly_ready == (TaskRef("sim", 1),)
    assert g.record_outcome(TaskRef("sim", 1), S).newly_ready == (TaskRef("sim", 2),)


@pytest.mark.parametrize(
    ("parent", "child", "task", "waits_on"),
    [
        # Equal chunking: task i waits on task i.
        (chunks(1, 30, 10), chunks(1, 30, 10), 1, ["a[1]"]),
        # Child chunk 11-20 over parent chunks of 5: 11-15 and 16-20.
        (chunks(1, 30, 5), chunks(1, 30, 10), 1, ["a[2]", "a[3]"]),
        # Child frame by frame over parent chunks of 10: frame 15 is in 11-20.
        (chunks(1, 30, 10), chunks(1, 30, 1), 14, ["a[1]"]),
        # Child chunk 8-14 straddles parent chunks 1-10 and 11-20.
        (chunks(1, 30, 10), chunks(1, 28, 7), 1, ["a[0]", "a[1]"]),
        # Overlapping, unsorted parent ranges.
        ([(20, 30), (1, 25), (5, 6)], [(6, 6), (26, 30)], 1, ["a[0]"]),
    ],
)
def test_elementwise_with_different_chunk_sizes(
    parent: list[tuple[int, int]], child: list[tuple[int, int]], task: int, waits_on: list[str]
) -> None:
    """A child task waits on exactly the parent tasks whose frame ranges overlap its own."""
    g = DependencyGraph()
    g.add_job("a", tasks=parent)
    g.add_job("b", tasks=child, dependencies=[Dependency(parent="a", elementwise=ElementMap())])
    assert [b.waits_on for b in g.blockers(TaskRef("b", task))] == waits_on


def test_elementwise_releases_incrementally() -> None:
    """Finishing one parent chunk releases only the child tasks it covers."""
    g = DependencyGraph()
    g.add_job("sim", tasks=chunks(1, 20, 5))
    g.add_job(
        "light",
        tasks=chunks(1, 20, 10),
        dependencies=[Dependency(parent="sim", elementwise=ElementMap())],
    )
    assert g.record_outcome(TaskRef("sim", 0), S).newly_ready == ()
    assert g.record_outcome(TaskRef("sim", 1), S).newly_ready == (TaskRef("light", 0),)
    assert g.record_outcome(TaskRef("sim", 3), S).newly_ready == ()
    assert g.record_outcome(TaskRef("sim", 2), S).newly_ready == (TaskRef("light", 1),)


def test_element_map_window() -> None:
    """before/after widen the needed window (frame f needs f-1 too) and clip at the edges."""
    g = DependencyGraph()
    g.add_job("a", tasks=chunks(1, 4, 1))
    g.add_job(
        "b",
        tasks=chunks(1, 4, 1),
        dependencies=[Dependency(parent="a", elementwise=ElementMap(before=1))],
    )
    assert [b.waits_on for b in g.blockers(TaskRef("b", 2))] == ["a[1]", "a[2]"]
    assert [b.waits_on for b in g.blockers(TaskRef("b", 0))] == ["a[0]"]


def test_element_window_no_parent_covers_is_rejected() -> None:
    """A child task whose window overlaps no parent task is rejected, naming it."""
    g = DependencyGraph()
    g.add_job("a", tasks=chunks(1, 10, 5))
    with pytest.raises(DependencyError, match=r"b\[1\].*no task of it covers") as info:
        g.add_job(
            "b",
            tasks=chunks(1, 20, 10),
            dependencies=[Dependency(parent="a", elementwise=ElementMap())],
        )
    assert (info.value.job, info.value.position) == ("b", 0)
    assert "b" not in g


def _job(name: str, *parents: str, tasks: int = 1) -> GraphJob:
    return GraphJob.with_tasks(name, tasks, [Dependency(parent=p) for p in parents])


@pytest.mark.parametrize(
    ("jobs", "cycle"),
    [
        ([_job("a", "b"), _job("b", "c"), _job("c", "a")], ("a", "b", "c", "a")),
        ([_job("c", "a"), _job("b", "c"), _job("a", "b")], ("a", "b", "c", "a")),
        ([_job("solo", "solo")], ("solo", "solo")),
        ([_job("x", "y"), _job("y", "x"), _job("z", "x")], ("x", "y", "x")),
        (
            [
                GraphJob.with_tasks("p", 2, [Dependency(parent="q", parent_task=0, child_task=1)]),
                _job("q", "p", tasks=2),
            ],
            ("p", "p[1]", "q[0]", "q", "p"),
        ),
        (
            [
                GraphJob.with_tasks(
                    "s",
                    2,
                    [
                        Dependency(parent="s", parent_task=0, child_task=1),
                        Dependency(parent="s", parent_task=1, child_task=0),
                    ],
                )
            ],
            ("s[0]", "s[1]", "s[0]"),
        ),
    ],
)
def test_cycles_are_rejected_with_their_path(jobs: list[GraphJob], cycle: tuple[str, ...]) -> None:
    """A cycle is rejected before anything is added; the error carries the path."""
    g = DependencyGraph()
    g.add_job("existing")
    before = g.snapshot()
    with pytest.raises(DependencyCycleError) as info:
        g.add_jobs(jobs)
    assert info.value.cycle == cycle
    assert " -> ".join(cycle) in str(info.value)
    assert g.snapshot() == before


def test_element_pipelines_both_ways_are_not_a_cycle() -> None:
    """Task edges in both directions between two jobs are fine when the tasks do not loop."""
    g = DependencyGraph()
    g.add_jobs(
        [
            GraphJob.with_tasks("a", 2, [Dependency(parent="b", parent_task=0, child_task=1)]),
            GraphJob.with_tasks("b", 2, [Dependency(parent="a", parent_task=0, child_task=1)]),
        ]
    )
    assert g.ready_tasks() == (TaskRef("a", 0), TaskRef("b", 0))


def test_add_dependency_refuses_a_cycle_through_existing_jobs() -> None:
    """A dependency added later is checked against the existing graph."""
    g = DependencyGraph()
    g.add_job("gate")
    g.add_job("a", dependencies=[Dependency(parent="gate")])
    g.add_job("b", dependencies=[Dependency(parent="a")])
    with pytest.raises(DependencyCycleError) as info:
        g.add_dependency("a", Dependency(parent="b"))
    assert info.value.cycle == ("a", "b", "a")
    g.add_job("c")
    g.add_dependency("a", Dependency(parent="c"))
    assert [b.waits_on for b in g.blockers("a")] == ["c", "gate"]
    with pytest.raises(DependencyError, match="already ready"):
        g.add_dependency("c", Dependency(parent="gate"))


@pytest.mark.parametrize(
    ("dependency", "missing"),
    [
        (Dependency(parent="ghost"), "ghost"),
        (Dependency(parent="a", parent_task=5), "a[5]"),
    ],
)
def test_unknown_dependency_names_it(dependency: Dependency, missing: str) -> None:
    """An unknown job or task is rejected with both ends named."""
    g = DependencyGraph()
    g.add_job("a", tasks=2)
    with pytest.raises(
        UnknownDependencyError, match=f"unknown .*{missing.replace('[', '.')}"
    ) as info:
        g.add_job("b", dependencies=[dependency])
    assert (info.value.dependant, info.value.dependency) == ("b", missing)
    assert "b" not in g


@pytest.mark.parametrize(
    "dependency",
    [
        Dependency(parent="a", threshold=0.5, condition=Condition.ON_FAILURE),
        Dependency(parent="a", threshold=0.5, parent_task=0),
        Dependency(parent="a", threshold=1.5),
        Dependency(parent="a", elementwise=ElementMap(), child_task=0),
        Dependency(parent="a", child_task=9),
    ],
)
def test_invalid_dependencies_are_rejected(dependency: Dependency) -> None:
    """Malformed dependencies are refused at submission."""
    g = DependencyGraph()
    g.add_job("a")
    with pytest.raises(DependencyError):
        g.add_job("b", dependencies=[dependency])


def test_duplicate_job_and_empty_job_are_rejected() -> None:
    """Ids are unique (live or passivated) and a job has at least one task."""
    g = DependencyGraph()
    g.add_job("a")
    with pytest.raises(DependencyError, match="already exists"):
        g.add_job("a")
    with pytest.raises(DependencyError, match="no tasks"):
        g.add_job("b", tasks=0)
    with pytest.raises(DependencyError, match="empty element range"):
        g.add_job("c", tasks=[(5, 1)])


def test_failure_makes_dependants_unreachable_with_reason() -> None:
    """A failed parent blocks on_success dependants; the reasons name it, transitively too."""
    g = DependencyGraph()
    g.add_job("sim", tasks=2)
    g.add_job("light", tasks=2, dependencies=[Dependency(parent="sim", elementwise=ElementMap())])
    g.add_job("comp", dependencies=[Dependency(parent="light")])
    update = g.record_outcome(TaskRef("sim", 1), F)
    assert update.newly_unreachable == (TaskRef("light", 1),)
    assert (
        g.unreachable(TaskRef("light", 1))
        == "light[1] waits on sim[1] (on_success), but sim[1] failed"
    )
    assert g.unreachable(TaskRef("light", 0)) is None
    reason = g.unreachable("comp")
    assert reason is not None
    assert reason.startswith("comp waits on light, which can never finish")
    assert "sim[1] failed" in reason
    blocker = [b for b in g.blockers(TaskRef("light", 1)) if b.unreachable]
    assert blocker[0].waits_on == "sim[1]"


def test_cascade_cancel_propagates_through_outcomes() -> None:
    """Cancelling an unreachable job propagates like any outcome (on_any_outcome runs)."""
    g = DependencyGraph()
    g.add_job("a")
    g.add_job("b", dependencies=[Dependency(parent="a")])
    g.add_job("cleanup", dependencies=[Dependency(parent="b", condition=Condition.ON_ANY_OUTCOME)])
    g.record_outcome("a", F)
    update = g.record_outcome("b", C)
    assert update.newly_ready == (TaskRef("cleanup", 0),)
    assert g.outcome(TaskRef("b", 0)) is C


def test_progress_threshold_releases_and_latches() -> None:
    """A threshold edge is met when progress reaches it and stays met afterwards."""
    g = DependencyGraph()
    g.add_job("render", tasks=4)
    g.add_job("preview", dependencies=[Dependency(parent="render", threshold=0.5)])
    assert g.record_progress("render", 0.25).newly_ready == ()
    assert "25%" in g.blockers("preview")[0].reason
    assert g.record_progress("render", 0.5).newly_ready == (TaskRef("preview", 0),)
    g.record_progress("render", 0.1)
    assert g.progress("render") == 0.5
    g.record_outcome("render", F)
    assert g.is_ready(TaskRef("preview", 0))


def test_progress_threshold_unreachable_when_parent_fails_first() -> None:
    """A threshold edge whose parent fails before the threshold is unreachable."""
    g = DependencyGraph()
    g.add_job("render")
    g.add_job("preview", dependencies=[Dependency(parent="render", threshold=0.5)])
    g.record_progress("render", 0.3)
    assert g.record_outcome("render", F).newly_unreachable == (TaskRef("preview", 0),)


def test_threshold_already_passed_at_submission() -> None:
    """A dependant submitted after the parent passed the threshold is ready at once."""
    g = DependencyGraph()
    g.add_job("render")
    g.record_progress("render", 0.8)
    assert g.add_job(
        "preview", dependencies=[Dependency(parent="render", threshold=0.5)]
    ).newly_ready


def test_outcomes_are_idempotent_and_consistent() -> None:
    """The same outcome twice is a no-op; a different one, or success with work left, raises."""
    g = DependencyGraph()
    g.add_job("a", tasks=2)
    g.record_outcome(TaskRef("a", 0), S)
    assert g.record_outcome(TaskRef("a", 0), S).newly_ready == ()
    with pytest.raises(DependencyError, match="already succeeded"):
        g.record_outcome(TaskRef("a", 0), F)
    with pytest.raises(DependencyError, match="unfinished"):
        g.record_outcome("a", S)
    g.record_outcome("a", F)
    assert g.outcome(TaskRef("a", 1)) is C
    assert g.ready_tasks() == ()


def test_passivated_parent_outcome_is_still_known() -> None:
    """After remove_job, new dependants still see the parent's job and task outcomes."""
    g = DependencyGraph()
    g.add_job("a", tasks=chunks(1, 4, 2))
    g.add_job("waiting", dependencies=[Dependency(parent="a")])
    g.record_outcome(TaskRef("a", 0), S)
    g.record_outcome(TaskRef("a", 1), F)
    g.record_outcome("a", F)
    g.remove_job("a")
    assert "a" in g
    assert g.jobs() == ("waiting",)
    assert g.unreachable("waiting") == "waiting waits on a (on_success), but a failed"
    g.add_job("late", dependencies=[Dependency(parent="a", condition=Condition.ON_FAILURE)])
    update = g.add_job(
        "frames",
        tasks=chunks(1, 4, 2),
        dependencies=[Dependency(parent="a", elementwise=ElementMap())],
    )
    assert update.newly_ready == (TaskRef("frames", 0),)
    assert update.newly_unreachable == (TaskRef("frames", 1),)
    assert g.is_ready(TaskRef("late", 0))
    with pytest.raises(DependencyError, match="passivated"):
        g.record_progress("a", 1.0)


def test_remove_job_needs_an_outcome() -> None:
    """Only finished jobs can be passivated."""
    g = DependencyGraph()
    g.add_job("a")
    with pytest.raises(DependencyError, match="no outcome"):
        g.remove_job("a")


def test_dependencies_and_dependants_of() -> None:
    """The graph names the unfinished jobs a job waits on and that wait on it."""
    g = DependencyGraph()
    g.add_job("a", tasks=2)
    g.add_job("b", tasks=2, dependencies=[Dependency(parent="a", elementwise=ElementMap())])
    g.add_job("c", dependencies=[Dependency(parent="a"), Dependency(parent="b")])
    assert g.dependencies_of("c") == ("a", "b")
    assert g.dependants_of("a") == ("b", "c")
    assert g.dependencies_of("b") == ("a",)


FACTS: list[Callable[[DependencyGraph], object]] = [
    lambda g: g.add_job("sim", tasks=chunks(1, 20, 5)),
    lambda g: g.add_jobs(
        [
            GraphJob(
                job_id="light",
                elements=tuple(chunks(1, 20, 10)),
                dependencies=(Dependency(parent="sim", elementwise=ElementMap()),),
            ),
            GraphJob.with_tasks("comp", 1, [Dependency(parent="light", threshold=0.5)]),
            GraphJob.with_tasks(
                "report", 1, [Dependency(parent="comp", condition=Condition.ON_ANY_OUTCOME)]
            ),
        ]
    ),
    lambda g: g.record_outcome(TaskRef("sim", 0), S),
    lambda g: g.record_outcome(TaskRef("sim", 1), S),
    lambda g: g.record_outcome(TaskRef("sim", 3), F),
    lambda g: g.record_progress("light", 0.5),
    lambda g: g.record_outcome(TaskRef("sim", 2), S),
    lambda g: g.record_outcome("sim", F),
    lambda g: g.remove_job("sim"),
    lambda g: g.record_outcome(TaskRef("comp", 0), S),
    lambda g: g.record_outcome("comp", S),
]


def test_rebuild_from_the_same_facts_gives_the_same_graph() -> None:
    """Replaying the same journaled facts rebuilds an identical graph at every step."""
    live = DependencyGraph()
    live_updates = [fact(live) for fact in FACTS]
    rebuilt = DependencyGraph()
    replayed_updates = [fact(rebuilt) for fact in FACTS]
    assert rebuilt.snapshot() == live.snapshot()
    assert replayed_updates == live_updates
    assert (
        rebuilt.ready_tasks() == live.ready_tasks() == (TaskRef("light", 0), TaskRef("report", 0))
    )
    for prefix in range(len(FACTS)):
        a, b = DependencyGraph(), DependencyGraph()
        for fact in FACTS[:prefix]:
            fact(a)
            fact(b)
        assert a.snapshot() == b.snapshot()


def test_outputs_are_sorted() -> None:
    """Ready tasks and updates come out sorted whatever the insertion order."""
    g = DependencyGraph()
    for name in ["zeta", "alpha", "mid"]:
        g.add_job(name, tasks=3)
    assert list(g.ready_tasks()) == sorted(g.ready_tasks())
    update = g.add_jobs([_job("y"), _job("b")])
    assert update.newly_ready == (TaskRef("b", 0), TaskRef("y", 0))
    assert str(TaskRef("b", 0)) == "b[0]"


def test_statistics() -> None:
    """statistics() counts jobs, tasks, ready tasks, explicit edges and passivated jobs."""
    g = DependencyGraph()
    g.add_job("a", tasks=3)
    g.add_job("b", dependencies=[Dependency(parent="a")])
    stats = g.statistics()
    assert (stats.jobs, stats.tasks, stats.ready, stats.edges, stats.passivated) == (2, 4, 3, 1, 0)
