"""Conditional branches: an edge with ``when`` runs its dependant only if the parent succeeded
with a reported metric meeting the condition; otherwise the dependant ends ``skipped``, which
satisfies ``on_any_outcome`` dependants, skips the others and never fails its job."""

from __future__ import annotations

import pytest
from engine_farm import job, open_farm

from actors import (
    ENGINE_CODEC,
    Condition,
    Dependency,
    DependencyError,
    DependencyGraph,
    GraphJob,
    MetricCondition,
    Outcome,
    SpecError,
    TaskRef,
    TaskSkipped,
    parse_spec,
)
from persistence import InMemoryJournal
from runtime import VirtualClock

S, F, K = Outcome.SUCCEEDED, Outcome.FAILED, Outcome.SKIPPED


@pytest.mark.parametrize(
    ("text", "metrics", "met"),
    [
        ("residual < 1e-3", {"residual": 1e-4}, True),
        ("residual < 1e-3", {"residual": 1e-3}, False),
        ("residual <= 1e-3", {"residual": 1e-3}, True),
        ("energy > -2.5", {"energy": -2.0}, True),
        ("energy >= 3", {"energy": 2.999}, False),
        ("steps == 10", {"steps": 10.0}, True),
        ("steps != 10", {"steps": 10.0}, False),
        ("residual < 1", {}, False),  # never reported: the branch is not taken
        ("  residual<.5  ", {"residual": 0.25}, True),
    ],
)
def test_metric_condition_table(text: str, metrics: dict[str, float], met: bool) -> None:
    """A metric condition compares the reported value; a metric never reported is false."""
    decided, why = MetricCondition.parse(text).decide(metrics)
    assert decided is met
    assert ("true" in why) is met


@pytest.mark.parametrize("text", ["residual", "residual < x", "< 3", "a ~ 3", "a < 1e999", ""])
def test_a_malformed_condition_is_refused_with_the_expected_form(text: str) -> None:
    """A condition that is not '<metric> <op> <number>' is refused, saying what is expected."""
    with pytest.raises(ValueError, match=r"metric condition|finite"):
        MetricCondition.parse(text)


@pytest.mark.parametrize(
    ("residual", "refine", "publish", "archive", "report"),
    [
        # refine runs when residual >= 1e-3, publish when < 1e-3; archive waits on refine
        # (on_success) and report on both (on_any_outcome).
        (0.5, None, K, None, None),
        (1e-5, K, None, K, None),
    ],
)
def test_a_branch_not_taken_skips_its_stage_and_on_success_followers(
    residual: float,
    refine: Outcome | None,
    publish: Outcome | None,
    archive: Outcome | None,
    report: Outcome | None,
) -> None:
    """The false branch and its on_success followers are skipped; on_any_outcome runs."""
    g = DependencyGraph()
    g.add_job(
        "sim",
        tasks=5,
        dependencies=[
            Dependency(parent="sim", parent_task=0, child_task=1, when="residual >= 1e-3"),
            Dependency(parent="sim", parent_task=0, child_task=2, when="residual < 1e-3"),
            Dependency(parent="sim", parent_task=1, child_task=3),
            Dependency(
                parent="sim", parent_task=1, child_task=4, condition=Condition.ON_ANY_OUTCOME
            ),
            Dependency(
                parent="sim", parent_task=2, child_task=4, condition=Condition.ON_ANY_OUTCOME
            ),
        ],
    )
    update = g.record_outcome(TaskRef("sim", 0), S, metrics={"residual": residual})
    skipped = {ref.index for ref in update.newly_skipped}
    assert skipped == {i for i, o in ((1, refine), (2, publish)) if o is K}
    assert all(reason.startswith("skipped: sim[0]: residual") for reason in update.skip_reasons)
    # The engine records the skips; the cascade follows.
    for index in sorted(skipped):
        update = g.record_outcome(TaskRef("sim", index), K)
        assert {r.index for r in update.newly_skipped} == ({3} if archive is K else set())
        for ref in update.newly_skipped:
            g.record_outcome(ref, K)
    ran = [i for i in (1, 2) if i not in skipped]
    for index in ran:
        assert g.is_ready(TaskRef("sim", index))
        g.record_outcome(TaskRef("sim", index), S)
    if archive is None:
        assert g.is_ready(TaskRef("sim", 3))
        g.record_outcome(TaskRef("sim", 3), S)
    assert g.is_ready(TaskRef("sim", 4))  # report ran whichever branch was taken


def test_a_failed_parent_makes_a_conditional_edge_unreachable_not_skipped() -> None:
    """'when' decides on success: a failed parent blocks (cancels) as on_success always did."""
    g = DependencyGraph()
    g.add_job("a")
    g.add_job("b", dependencies=[Dependency(parent="a", when="x < 1")])
    update = g.record_outcome(TaskRef("a", 0), F)
    assert update.newly_skipped == ()
    update = g.record_outcome("a", F)
    assert update.newly_unreachable == (TaskRef("b", 0),)


def test_an_edge_onto_a_finished_parent_decides_at_once_from_its_kept_metrics() -> None:
    """A dependant added after its parent ended (even passivated) is decided from the
    metrics the parent reported; a skipped job skips its on_success dependants."""
    g = DependencyGraph()
    g.add_job("sim", tasks=2)
    g.record_outcome(TaskRef("sim", 0), S, metrics={"residual": 0.1})
    g.record_outcome(TaskRef("sim", 1), S, metrics={"residual": 0.2})
    g.record_outcome("sim", S, metrics={"residual": 0.2})
    g.remove_job("sim")
    taken = g.add_job(
        "extra", dependencies=[Dependency(parent="sim", parent_task=0, when="residual < 0.15")]
    )
    assert taken.newly_ready == (TaskRef("extra", 0),)
    not_taken = g.add_job(
        "more", tasks=2, dependencies=[Dependency(parent="sim", when="residual < 0.15")]
    )
    assert not_taken.newly_skipped == (TaskRef("more", 0), TaskRef("more", 1))
    assert "residual = 0.2" in not_taken.skip_reasons[0]
    for index in (0, 1):
        g.record_outcome(TaskRef("more", index), K)
    g.record_outcome("more", K)
    g.add_job("after", dependencies=[Dependency(parent="more")])
    g.add_job(
        "anyway", dependencies=[Dependency(parent="more", condition=Condition.ON_ANY_OUTCOME)]
    )
    assert not g.is_ready(TaskRef("after", 0))
    assert g.blockers(TaskRef("after", 0))[0].skip
    assert g.is_ready(TaskRef("anyway", 0))


def test_a_rebuilt_graph_keeps_the_metrics_a_passivated_job_reported() -> None:
    """``add_passivated`` with the journaled metrics decides a later branch as live would."""
    g = DependencyGraph()
    g.add_passivated(GraphJob.with_tasks("sim", 1), S, [S], metrics={0: {"residual": 0.5}})
    update = g.add_job(
        "b", dependencies=[Dependency(parent="sim", parent_task=0, when="residual < 0.1")]
    )
    assert update.newly_skipped == (TaskRef("b", 0),)


@pytest.mark.parametrize(
    ("dependency", "problem"),
    [
        (Dependency(parent="a", when="r <"), "metric condition"),
        (Dependency(parent="a", when="r < 1", condition=Condition.ON_FAILURE), "on_success"),
        (Dependency(parent="a", when="r < 1", threshold=0.5), "on_success and no threshold"),
    ],
)
def test_the_graph_refuses_a_bad_conditional_edge(dependency: Dependency, problem: str) -> None:
    """A malformed condition, or one on a non-success edge, is refused at submission."""
    g = DependencyGraph()
    g.add_job("a")
    with pytest.raises(DependencyError, match=problem):
        g.add_job("b", dependencies=[dependency])


_SPEC = """
[[jobs]]
name = "sim"
command = ["inprocess:ok"]
[[jobs.tasks]]
name = "solve"
command = ["inprocess:chatty", "{residuals}"]
[[jobs.tasks]]
name = "refine"
depends_on = [{{ task = "solve", when = "residual >= 1" }}]
[[jobs.tasks]]
name = "publish"
depends_on = [{{ task = "solve", when = "residual < 1" }}]
[[jobs.tasks]]
name = "archive"
depends_on = ["refine"]
[[jobs.tasks]]
name = "report"
depends_on = [
  {{ task = "refine", condition = "on_any_outcome" }},
  {{ task = "publish", condition = "on_any_outcome" }},
]
"""


@pytest.mark.parametrize(("residuals", "skipped"), [(1, {"refine", "archive"}), (3, {"publish"})])
async def test_an_engine_skips_the_branch_not_taken_and_completes_the_job(
    residuals: int, skipped: set[str]
) -> None:
    """Stages of a job branch on a reported metric: the skipped ones are journaled with the
    reason, the report stage runs anyway, the job completes, and a restart keeps it so."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    text = _SPEC.format(residuals=residuals)  # chatty reports residual 0 .. residuals-1
    async with open_farm(journal=journal, clock=clock) as farm:
        jobs = parse_spec(text, fmt="toml").to_commands().jobs
        await farm.engine.submit(jobs)
        summary = await farm.wait("sim")
        assert summary.status == "completed"
        detail = (await farm.engine.status("sim", tasks=True))[0]
        statuses = {t.name: t.status for t in detail.tasks}
        assert {n for n, s in statuses.items() if s == "skipped"} == skipped
        assert {n for n, s in statuses.items() if s == "completed"} == set(statuses) - skipped
        reasons = [e.reason for e in await farm.events("sim") if isinstance(e, TaskSkipped)]
        assert any("residual" in r for r in reasons)
        assert summary.progress == 1.0
    async with open_farm(journal=journal, clock=clock) as farm:
        assert (await farm.engine.status("sim"))[0].status == "completed"


async def test_a_stage_added_after_a_restart_branches_on_the_finished_stage() -> None:
    """A job added later that depends on a finished stage with 'when' is decided from the
    journaled metrics, after a restart too: all its tasks are skipped, its on_success
    dependants too, its on_any_outcome ones run."""
    clock = VirtualClock(auto_advance=True)
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)
    async with open_farm(journal=journal, clock=clock) as farm:
        await farm.engine.submit(
            parse_spec(_SPEC.format(residuals=3), fmt="toml").to_commands().jobs
        )
        await farm.wait("sim")
    async with open_farm(journal=journal, clock=clock) as farm:
        await farm.engine.submit(
            [
                job(
                    "extra",
                    tasks=2,
                    dependencies=[Dependency(parent="sim", parent_task=0, when="residual < 1")],
                ),
                job("after", dependencies=[Dependency(parent="extra")]),
                job(
                    "anyway",
                    dependencies=[Dependency(parent="extra", condition=Condition.ON_ANY_OUTCOME)],
                ),
            ]
        )
        extra = await farm.wait("extra")
        assert extra.status == "completed"
        assert extra.reason == "every task was skipped"
        assert extra.task_counts == {"skipped": 2}
        assert (await farm.wait("anyway")).status == "completed"
        after = await farm.wait("after")
        assert after.task_counts == {"skipped": 1}
        assert farm.works.of("after") == []


@pytest.mark.parametrize(
    ("entry", "field", "problem"),
    [
        ('{ task = "a", when = "residual" }', "tasks[1].depends_on[0].when", "metric condition"),
        (
            '{ task = "a", when = "r < 1", condition = "on_failure" }',
            "tasks[1].depends_on[0].when",
            "decides on the parent's success",
        ),
    ],
)
def test_a_spec_with_a_bad_when_names_the_field(entry: str, field: str, problem: str) -> None:
    """A bad 'when' in a spec file is refused naming the field and what is expected."""
    text = f"""
[[jobs]]
name = "j"
command = ["x"]
[[jobs.tasks]]
name = "a"
[[jobs.tasks]]
name = "b"
depends_on = [{entry}]
"""
    with pytest.raises(SpecError) as raised:
        parse_spec(text, fmt="toml", source="sim.toml")
    assert raised.value.field == f"jobs[0].{field}"
    assert problem in raised.value.problem
