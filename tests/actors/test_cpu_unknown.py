"""An attempt's CPU time is a measurement or nothing: in-process and simulated work is not
measured, so its end event leaves ``cpu_s`` out (None) instead of claiming 0.0, the task's sum
counts only measured attempts, and events journaled with 0.0 before still read as 0.0."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from engine_farm import CPU4, open_farm
from engine_farm import job as engine_job

from actors import (
    ENGINE_CODEC,
    JobAggregate,
    JobState,
    JobSubmitted,
    SubmitJob,
    TaskCompleted,
    TaskFailed,
    TaskSpec,
)
from actors.cli._format import jobs_json

_T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_in_process_work_journals_no_cpu_time_and_status_says_unknown() -> None:
    """An in-process attempt's TaskCompleted has no cpu_s in its payload; status --json says
    null for the task, not 0.0."""
    async with open_farm({"n1": CPU4}) as farm:
        await farm.engine.submit([engine_job("a")])
        await farm.engine.wait_job("a")
        [completed] = [e for e in await farm.events("a") if isinstance(e, TaskCompleted)]
        (summary,) = await farm.engine.status("a", tasks=True)
    assert completed.cpu_s is None
    assert b"cpu_s" not in ENGINE_CODEC.encode(completed).payload
    assert summary.tasks[0].cpu_s is None
    [shown] = jobs_json([summary], as_of=None, with_tasks=True)
    assert json.loads(json.dumps(shown))["tasks"][0]["cpu_s"] is None


def _spec() -> SubmitJob:
    return SubmitJob(job_id="j", name="j", command=("x",), tasks=(TaskSpec(index=0, name="0"),))


@pytest.mark.parametrize(
    ("measured", "total"),
    [
        ((None,), None),
        ((None, None), None),
        ((1.5,), 1.5),
        ((None, 1.5), 1.5),
        ((1.5, None, 0.25), 1.75),
        ((0.0,), 0.0),  # an old journal's 0.0 is kept as it was written
    ],
)
def test_a_tasks_cpu_time_sums_only_measured_attempts(
    measured: tuple[float | None, ...], total: float | None
) -> None:
    """Failed attempts then a completed one: the task's cpu_s adds the measured ones, and is
    None when none was measured."""
    aggregate = JobAggregate()
    state = aggregate.apply(JobState(), JobSubmitted(job=_spec(), submitted_at=_T0))
    *failed, last = measured
    for token, cpu in enumerate(failed, start=1):
        state = aggregate.apply(state, TaskFailed(task=0, token=token, outcome="failed", cpu_s=cpu))
    state = aggregate.apply(state, TaskCompleted(task=0, token=len(measured), cpu_s=last))
    assert state.tasks[0].cpu_s == total


def test_end_events_journaled_with_zero_cpu_time_still_decode_as_zero() -> None:
    """Payloads written when cpu_s was always a number decode unchanged."""
    completed = ENGINE_CODEC.decode(
        "engine.task_completed",
        1,
        '{"task": 0, "token": 1, "runtime_s": 2.0, "cpu_s": 0.0, "peak_rss": 0}',
    )
    failed = ENGINE_CODEC.decode(
        "engine.task_failed", 1, '{"task": 0, "token": 1, "outcome": "failed", "cpu_s": 0.0}'
    )
    assert isinstance(completed, TaskCompleted)
    assert isinstance(failed, TaskFailed)
    assert (completed.cpu_s, completed.runtime_s, failed.cpu_s) == (0.0, 2.0, 0.0)
