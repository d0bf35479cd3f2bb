"""Client shares: dominant-share usage, maxima never exceeded (even on an idle farm), borrowing
of idle guarantees within limits, no lending to others while a lender's work waits, loans
recorded against the actual lenders, and reclaim by preemption after ``reclaim_after``."""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio
import anyio.lowlevel
import pytest

from actors import (
    AttemptSpec,
    Resources,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    TaskPreempted,
    TaskRequeued,
)
from domains.render_farm import RenderFarmPolicy, RenderJob, RenderNode, parse_farm_config
from domains.render_farm._shares import (
    POOL,
    ShareState,
    Totals,
    admit_share,
    dominant_share,
    lendable,
    loans,
)
from domains.render_farm._simulation import open_simulated_farm
from persistence import RecordedEvent

WAIT = 30.0  # real seconds: a backstop


@pytest.mark.parametrize(
    ("request_", "share"),
    [
        (Resources.of(cores=10, memory="1GiB"), 0.1),  # cores dominate
        (Resources.of(cores=1, memory="512GiB"), 0.5),  # memory dominates
        (Resources.of(cores=1, memory="1GiB", gpus=2), 0.25),  # GPUs dominate
    ],
)
def test_usage_is_the_dominant_share(request_: Resources, share: float) -> None:
    """The largest fraction of the farm's cores, memory or GPUs."""
    totals = Totals(millicores=100_000, memory=1024 * 2**30, gpus=8)
    assert dominant_share(request_, totals) == pytest.approx(share)


def _states(**used: float) -> dict[str, ShareState]:
    # a: 50 % guaranteed (max 80, may borrow 20); b: 30 % (max 30); c: 20 % (max 100)
    shape = {"a": (0.5, 0.8, 0.2), "b": (0.3, 0.3, 0.0), "c": (0.2, 1.0, 1.0)}
    return {
        client: ShareState(guaranteed=g, maximum=m, borrowing_limit=b, used=used.get(client, 0.0))
        for client, (g, m, b) in shape.items()
    }


@pytest.mark.parametrize(
    ("client", "task", "used", "waiting", "allowed", "why"),
    [
        ("a", 0.1, {"a": 0.3}, (), True, ""),  # within its guarantee
        ("a", 0.1, {"a": 0.5}, (), True, ""),  # borrows idle guarantee of b and c
        ("a", 0.1, {"a": 0.8}, (), False, "at its maximum"),  # never above the maximum
        ("b", 0.05, {"b": 0.3}, (), False, "at its maximum"),  # maximum = guarantee
        ("a", 0.1, {"a": 0.7}, (), True, ""),  # 0.3 borrowed > 0.2 limit? 0.8 - 0.5 = 0.3
        ("c", 0.1, {"c": 0.2, "a": 0.5}, ("b",), False, "reclaim"),  # b waits: not lent
        ("c", 0.1, {"c": 0.2, "a": 0.5}, (), True, ""),  # b idle: lent
        ("c", 0.1, {"c": 0.2, "a": 0.5, "b": 0.3}, (), False, "nothing idle"),
    ],
)
def test_share_admission(
    client: str,
    task: float,
    used: dict[str, float],
    waiting: tuple[str, ...],
    allowed: bool,
    why: str,
) -> None:
    """Admission of one more task: maxima, guarantees, borrowing limits, waiting lenders."""
    states = _states(**used)
    for name in waiting:
        states[name] = ShareState(
            guaranteed=states[name].guaranteed,
            maximum=states[name].maximum,
            borrowing_limit=states[name].borrowing_limit,
            used=states[name].used,
            waiting=True,
        )
    if client == "a" and used.get("a") == 0.7:
        # 0.7 + 0.1 = 0.8: borrowed 0.3 > its borrowing limit of 0.2
        allowed, why = False, "borrowing limit"
    reason = admit_share(client, task, states)
    assert (reason is None) is allowed, reason
    if why:
        assert reason is not None
        assert why in reason


def test_loans_are_recorded_against_the_actual_lenders() -> None:
    """Unguaranteed capacity first, then the clients leaving guarantee unused, in proportion."""
    states = {
        "a": ShareState(guaranteed=0.4, maximum=1.0, borrowing_limit=1.0, used=0.7),
        "b": ShareState(guaranteed=0.3, maximum=1.0, borrowing_limit=1.0, used=0.1),
        "c": ShareState(guaranteed=0.2, maximum=1.0, borrowing_limit=1.0, used=0.1),
    }
    ledger = loans(states)
    assert ledger["a"][POOL] == pytest.approx(0.1)  # 10 % nobody is guaranteed
    assert ledger["a"]["b"] == pytest.approx(0.2 * 0.2 / 0.3)
    assert ledger["a"]["c"] == pytest.approx(0.2 * 0.1 / 0.3)
    assert set(ledger) == {"a"}
    assert lendable(states, borrower="a") == pytest.approx(0.1 + 0.2 + 0.1)


# -- on the engine ----------------------------------------------------------------------------

FARM = """
reclaim_after = "2m"
[[clients]]
id = "capped"
guaranteed = 10
maximum = 25
[[clients]]
id = "studio"
guaranteed = 50
maximum = 100
[[clients]]
id = "lender"
guaranteed = 40
maximum = 100
[energy]
mode = "performance"
"""

NODES = [RenderNode(name=f"n{i}", cores=4, memory="16GiB") for i in range(4)]
WHOLE_NODE = Resources.of(cores=4, memory="4GiB")


def _job(name: str, client: str, frames: int, **fields: object) -> RenderJob:
    return RenderJob(
        name=name,
        client=client,
        command=["render", "{start}"],
        frames=(1, frames),
        frame_estimate=600,
        resources=WHOLE_NODE,
        preview=None,
        **fields,  # type: ignore[arg-type]
    )


def _no_previews() -> str:
    return FARM + "[previews]\nstride = 1\n"


def _most_at_once(records: list[RecordedEvent]) -> int:
    """Return how many attempts of a job ran at once at most (from its journal stream)."""
    edges: list[tuple[datetime, int]] = []
    for record in records:
        if isinstance(record.event, TaskAssigned):
            edges.append((record.timestamp, 1))
        elif isinstance(record.event, TaskCompleted | TaskFailed | TaskRequeued):
            edges.append((record.timestamp, -1))
    most = current = 0
    for _, step in sorted(edges):  # at one instant an end (-1) sorts before a start
        current += step
        most = max(most, current)
    return most


async def test_a_client_at_its_maximum_gets_nothing_more_even_when_the_farm_is_idle() -> None:
    """A client allowed 25 % of four nodes runs one task at a time although three nodes idle,
    and ``why`` says so."""
    policy = RenderFarmPolicy(parse_farm_config(_no_previews()))

    def duration(node: str, spec: AttemptSpec) -> float:
        return 600.0

    async with open_simulated_farm(policy=policy, nodes=NODES, duration=duration) as farm:
        farm.clock.activity.acquire()  # time stands still while the test looks
        [job_id] = await farm.engine.submit([_job("capped-shot", "capped", 4).to_spec()])
        with anyio.fail_after(WAIT):
            while (view := farm.engine.core.farm.jobs.get(job_id)) is None or not view.running:
                await anyio.lowlevel.checkpoint()
        assert "at its maximum" in await farm.engine.why(job_id)
        farm.clock.activity.release()
        summary = await farm.engine.wait_job(job_id)
        assert summary.status == "completed"
        assert _most_at_once(await farm.journal.read_stream(f"job:{job_id}")) == 1
        assert farm.clock.monotonic() >= 4 * 600.0


async def test_work_of_a_lender_is_not_refilled_over_and_reclaims_by_preemption() -> None:
    """A borrower fills the idle farm; the lender's job then waits: borrowers are not
    refilled, and after reclaim_after (2 min) a borrower yields a node to the lender."""
    policy = RenderFarmPolicy(parse_farm_config(_no_previews()))

    def duration(node: str, spec: AttemptSpec) -> float:
        return 3600.0

    async with open_simulated_farm(policy=policy, nodes=NODES, duration=duration) as farm:
        engine = farm.engine
        studio = _job("studio-shot", "studio", 8, checkpointable=True, preemptible=True)
        farm.clock.activity.acquire()  # time stands still while the test looks
        await engine.submit([studio.to_spec()])
        with anyio.fail_after(WAIT):
            while (view := engine.core.farm.jobs.get("studio-shot")) is None or view.running < 4:
                await anyio.lowlevel.checkpoint()
        started = farm.clock.now()
        lender = _job("lender-shot", "lender", 1)
        await engine.submit([lender.to_spec()])
        farm.clock.activity.release()
        summary = await engine.wait_job("lender-shot")
        assert summary.status == "completed"
        preempted = [
            r.timestamp
            for r in await farm.journal.read_stream("job:studio-shot")
            if isinstance(r.event, TaskPreempted)
        ]
        assert len(preempted) == 1
        waited = preempted[0] - started
        assert timedelta(minutes=2) <= waited <= timedelta(minutes=3)
