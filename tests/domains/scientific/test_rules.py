"""Tables for the science policy's pure rules: protection, fair share and the starvation
bound, checkpoint intervals, recovery strategies and reliability, scenario scoring and
successive halving."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from actors import (
    Failure,
    JobView,
    Priority,
    Resources,
    RunningView,
    SubmitJob,
    TaskSpec,
)
from domains.scientific import ClusterConfig, parse_cluster_config
from domains.scientific._checkpointing import (
    checkpoint_cost,
    checkpoint_interval,
    daly_interval,
    expected_waste,
)
from domains.scientific._fairshare import (
    UsageLedger,
    fair_share_factor,
    points,
    starvation_bound,
)
from domains.scientific._protection import PreemptionLedger, protection_reason
from domains.scientific._recovery import NodeReliability, classify, recovery_decision
from domains.scientific._scenarios import Member, halving, score

T0 = datetime(2027, 3, 1, tzinfo=UTC)
H = 3600.0
CONFIG = ClusterConfig()


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def running(
    priority: Priority,
    *,
    started: float = 0.0,
    job: str = "victim",
    preemptible: bool = True,
    checkpointable: bool = True,
) -> RunningView:
    spec = SubmitJob(
        job_id=job,
        name=job,
        priority=priority,
        command=("x",),
        tasks=(TaskSpec(index=0, name="main"),),
        preemptible=preemptible,
        checkpointable=checkpointable,
    )
    view = JobView(job_id=job, spec=spec, submitted_at=T0, total=1)
    return RunningView(
        job_id=job,
        task=0,
        request=Resources.of(cores=1),
        node="n1",
        started_at=at(started),
        job=view,
    )


# -- protection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("victim", "waiting", "now", "ran", "earlier", "allowed", "why"),
    [
        (Priority.LOW, Priority.HIGH, 2.0, 1.5, [], True, None),
        (Priority.LOW, Priority.HIGH, 2.0, 0.5, [], False, "minimum runtime"),
        (Priority.LOW, Priority.LOW, 2.0, 1.5, [], False, "not below"),
        (Priority.MEDIUM, Priority.CRITICAL, 20.0, 2.0, [1.0, 8.0], False, "budget of 2"),
        (Priority.MEDIUM, Priority.CRITICAL, 32.0, 2.0, [1.0, 8.0], True, None),  # 1.0 expired
        (Priority.LOW, Priority.HIGH, 10.0, 2.0, [5.0], False, "protected"),  # within 6 h
        (Priority.LOW, Priority.HIGH, 11.5, 2.0, [5.0], True, None),
        (Priority.HIGH, Priority.CRITICAL, 30.0, 2.0, [1.0], True, None),
        (Priority.HIGH, Priority.CRITICAL, 12.0, 2.0, [1.0, 10.0], False, "protected"),
        (Priority.HIGH, Priority.CRITICAL, 20.0, 2.0, [1.0, 10.0], False, "budget of 1"),
        (Priority.BACKGROUND, Priority.LOW, 70.0, 2.0, [50, 57, 63], True, None),
    ],
)
def test_protection_table(
    victim: Priority,
    waiting: Priority,
    now: float,
    ran: float,
    earlier: list[float],
    allowed: bool,
    why: str | None,
) -> None:
    """Budgets per priority per 24 h, the minimum runtime, the protection window and the
    priority gap decide whether a running stage may yield."""
    ledger = PreemptionLedger()
    for hours in earlier:
        ledger.record("victim", at(hours))
    reason = protection_reason(
        running(victim, started=now - ran), waiting, ledger, CONFIG.protection, at(now)
    )
    assert (reason is None) is allowed
    if why is not None:
        assert reason is not None
        assert why in reason


def test_a_critical_simulation_is_never_preempted_and_nothing_without_checkpoints() -> None:
    """Critical's budget is 0; work that cannot checkpoint never yields to a waiting stage."""
    ledger = PreemptionLedger()
    never = protection_reason(
        running(Priority.CRITICAL, started=0), Priority.CRITICAL, ledger, CONFIG.protection, at(9)
    )
    assert never is not None
    plain = running(Priority.LOW, checkpointable=False)
    assert "checkpoint" in str(
        protection_reason(plain, Priority.HIGH, ledger, CONFIG.protection, at(9))
    )


@pytest.mark.parametrize(
    ("priority", "per_day"),
    [("critical", 0), ("high", 1), ("medium", 2), ("low", 4), ("background", 8)],
)
def test_the_default_budgets_per_day(priority: str, per_day: int) -> None:
    """The defaults are critical 0, high 1, medium 2, low 4, background 8 a day, and the
    config may change them."""
    assert CONFIG.protection.budget(Priority(priority)) == per_day
    custom = parse_cluster_config(f"[protection]\nbudgets = {{ {priority} = 7 }}")
    assert custom.protection.budget(Priority(priority)) == 7


# -- fair share and aging -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "total", "weight", "total_weight", "factor"),
    [
        (0.0, 0.0, 1.0, 2.0, 1.0),
        (0.0, 100.0, 1.0, 2.0, 1.0),
        (50.0, 100.0, 1.0, 2.0, 0.5),  # exactly its share
        (100.0, 100.0, 1.0, 2.0, 0.25),  # twice its share
        (25.0, 100.0, 1.0, 2.0, 2**-0.5),
        (50.0, 100.0, 3.0, 4.0, 2 ** -(2 / 3)),  # a bigger weight, the same usage
    ],
)
def test_fair_share_factor_table(
    usage: float, total: float, weight: float, total_weight: float, factor: float
) -> None:
    """The factor is 2^-(usage share / target share): 1 unused, 1/2 at its share."""
    assert fair_share_factor(usage, total, weight, total_weight) == pytest.approx(factor)


def test_usage_decays_with_its_half_life_and_counts_running_attempts() -> None:
    """Usage halves every half-life; a running attempt counts what it used so far."""
    ledger = UsageLedger(half_life=7 * 86400.0)
    ledger.charge("ana", "climate", 1000.0, T0)
    owners, projects = ledger.usage(T0 + timedelta(days=7))
    assert owners["ana"] == pytest.approx(500.0)
    assert projects["climate"] == pytest.approx(500.0)
    ledger.started(("job", 0), "bo", "ocean", 4.0, T0)
    owners, _ = ledger.usage(T0 + timedelta(seconds=100))
    assert owners["bo"] == pytest.approx(400.0)
    ledger.ended(("job", 0), T0 + timedelta(seconds=100))
    owners, _ = ledger.usage(T0 + timedelta(days=14, seconds=100))
    assert owners["bo"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("a", "b", "a_first"),
    [
        # (priority rank, owner factor, project factor, waited s, survived)
        ((4, 1.0, 1.0, 0, 0), (0, 1.0, 1.0, 0, 0), True),
        ((2, 0.1, 0.1, 0, 0), (2, 0.9, 0.9, 0, 0), False),  # heavy user after light user
        ((0, 0.0, 0.0, 6 * 86400, 0), (4, 1.0, 1.0, 0, 0), True),  # aging beats everything
        ((0, 0.0, 0.0, 4 * 86400, 0), (4, 1.0, 1.0, 0, 0), False),  # not yet
        ((2, 0.5, 0.5, 0, 2), (2, 0.5, 0.5, 0, 0), True),  # a survivor goes first
    ],
)
def test_points_order_table(
    a: tuple[int, float, float, float, int], b: tuple[int, float, float, float, int], a_first: bool
) -> None:
    """Priority, fair share, aging and survival add up; more points go first."""

    def of(values: tuple[int, float, float, float, int]) -> float:
        rank, owner, project, waited, survived = values
        return points(
            rank=rank,
            owner_factor=owner,
            project_factor=project,
            waited=waited,
            survived=survived,
            settings=CONFIG.fair_share,
        ).total

    assert (of(a) > of(b)) is a_first


def test_the_starvation_bound_is_what_outranks_everything() -> None:
    """Waiting the bound longer than another outranks it at any priority, usage and survival,
    and just less than the bound does not against the strongest opponent."""
    settings = CONFIG.fair_share
    rungs = len(CONFIG.scenarios.rungs)
    bound = starvation_bound(settings, rungs)
    assert bound == pytest.approx((4 + 1 + 0.5 * rungs) * 86400.0)

    def total(rank: int, factor: float, waited: float, survived: int) -> float:
        return points(
            rank=rank,
            owner_factor=factor,
            project_factor=factor,
            waited=waited,
            survived=survived,
            settings=settings,
        ).total

    weakest = total(0, 0.0, bound + 60, 0)
    strongest = total(4, 1.0, 0.0, rungs)
    assert weakest > strongest
    assert total(0, 0.0, bound - 3600, 0) < strongest


# -- checkpoint intervals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "minutes"), [("low", 120), ("medium", 60), ("high", 30), ("critical", 15)]
)
def test_without_measurements_the_level_sets_the_interval(level: str, minutes: int) -> None:
    """Nothing measured: the resilience level's interval (120/60/30/15 minutes)."""
    found = checkpoint_interval(level, None, 30 * 86400.0, CONFIG.checkpoints)
    assert found.seconds == minutes * 60


def test_daly_interval_is_the_optimum_of_the_expected_waste() -> None:
    """Daly's interval is within 1 % of the brute-force minimum of overhead plus rework."""
    for cost, mtbf in ((50.0, 20 * 86400.0), (600.0, 5 * 86400.0), (10.0, 86400.0)):
        best = min(range(60, 200_000, 30), key=lambda t: expected_waste(t, cost, mtbf))
        daly = daly_interval(cost, mtbf)
        assert expected_waste(daly, cost, mtbf) <= expected_waste(best, cost, mtbf) * 1.01


@pytest.mark.parametrize(
    ("level", "cost", "mtbf_days", "expected", "why"),
    [
        # Cheap checkpoints, rare failures: Daly wants ~4.5 h; medium allows up to 4 h.
        ("medium", 50.0, 30.0, 4 * 3600.0, "at most"),
        # Costly checkpoints: more often than 600 / 0.02 = 8.3 h would cost over 2 %.
        ("critical", 600.0, 1.0, 600.0 / 0.02, "more than 2%"),
        # Frequent failures: Daly's optimum sits between the bounds.
        ("low", 30.0, 0.5, daly_interval(30.0, 0.5 * 86400), "optimum"),
    ],
)
def test_measured_cost_and_failures_adapt_the_interval(
    level: str, cost: float, mtbf_days: float, expected: float, why: str
) -> None:
    """Daly's optimum, never costing over the overhead share, at most 4x the level."""
    found = checkpoint_interval(level, cost, mtbf_days * 86400.0, CONFIG.checkpoints)
    assert found.seconds == pytest.approx(expected)
    assert why in found.why
    assert cost / found.seconds <= CONFIG.checkpoints.max_overhead + 1e-9


GIB = 1024**3


@pytest.mark.parametrize(
    ("manifest_bytes", "measured", "configured", "seconds", "source"),
    [
        # The latest verified manifest wins: what the stage writes now.
        (30 * GIB, 12.0, 8 * GIB, 30.0, "30.0 GiB by its last checkpoint's manifest at 1.0 GiB/s"),
        (512 * 1024**2, None, 0, 0.5, "512.0 MiB by its last checkpoint's manifest"),
        # No manifest (none yet, or a checkpoint reported without one): the metric...
        (0, 12.0, 8 * GIB, 12.0, "a reported checkpoint_seconds"),
        # ... else the configured size ...
        (0, None, 8 * GIB, 8.0, "checkpoint_size 8.0 GiB at 1.0 GiB/s"),
        # ... else unknown: the resilience level's interval.
        (0, None, 0, None, "unknown"),
    ],
)
def test_the_checkpoint_cost_comes_from_the_manifest_first(
    manifest_bytes: int, measured: float | None, configured: int, seconds: float | None, source: str
) -> None:
    """Cost = the latest verified manifest's size / bandwidth, else a checkpoint_seconds
    metric, else the configured checkpoint_size / bandwidth, else unknown."""
    cost = checkpoint_cost(
        manifest_bytes=manifest_bytes,
        measured=measured,
        configured_size=configured,
        bandwidth=float(GIB),
    )
    assert cost.seconds == seconds
    assert source in cost.source


def test_adaptation_wastes_less_than_a_fixed_hour() -> None:
    """For a 50 s checkpoint and a 20-day MTBF the adapted interval wastes under 0.8x what
    a fixed 60-minute interval does (overhead plus rework)."""
    mtbf = 20 * 86400.0
    adapted = checkpoint_interval("medium", 50.0, mtbf, CONFIG.checkpoints).seconds
    assert expected_waste(adapted, 50.0, mtbf) <= 0.8 * expected_waste(3600.0, 50.0, mtbf)


# -- recovery -----------------------------------------------------------------------------------


def failure(kind: str, error: str | None = None, exit_code: int | None = 1) -> Failure:
    return Failure(kind=kind, node="n1", attempt=1, error=error, exit_code=exit_code)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (failure("lost"), "lost"),
        (failure("oom"), "oom"),
        (failure("timeout"), "timeout"),
        (failure("stall"), "stall"),
        (failure("exit_code", "segfault"), "crash"),
        (failure("signal", exit_code=-9), "crash"),
        (failure("exit_code", "OSError: [Errno 28] No space left on device"), "disk_full"),
        (failure("exit_code", exit_code=28), "disk_full"),
    ],
)
def test_failure_classes(given: Failure, expected: str) -> None:
    """Failures are classified: lost node, crash, OOM, timeout, stall, disk full."""
    assert classify(given) == expected


@pytest.mark.parametrize(
    ("kind", "earlier", "failures", "action", "delay", "elsewhere", "memory_gib"),
    [
        ("crash", 0, 0, "retry", 300, True, 4),
        ("crash", 1, 1, "retry", 600, False, 4),
        ("crash", 2, 2, "hold", 0, False, 4),
        ("oom", 0, 0, "retry", 300, False, 6),
        ("oom", 1, 3, "retry", 2400, False, 6),
        ("oom", 2, 4, "retry", 3600, True, 4),
        ("oom", 3, 7, "hold", 0, False, 4),
        ("timeout", 0, 0, "retry", 300, False, 4),
        ("stall", 0, 2, "retry", 1200, True, 4),
        ("disk_full", 1, 1, "hold", 0, False, 4),
    ],
)
def test_strategies_in_order_with_backoff(
    kind: str,
    earlier: int,
    failures: int,
    action: str,
    delay: float,
    elsewhere: bool,
    memory_gib: int,
) -> None:
    """The n-th failure of a class gets the class's n-th strategy; the k-th retry waits
    5, 10, 20, 40, then 60 minutes."""
    request = Resources.of(cores=4, memory="4GiB")
    decision = recovery_decision(
        kind=kind,  # type: ignore[arg-type]
        earlier=earlier,
        failures=failures,
        failure=failure("exit_code"),
        request=request,
        largest_memory=64 * 2**30,
        settings=CONFIG.recovery,
    )
    assert decision.action == action
    if action == "retry":
        assert decision.delay == delay
        assert (decision.avoid_node == "n1") is elsewhere
        memory = (decision.resources or request).memory
        assert memory == memory_gib * 2**30
    else:
        assert "operator" in decision.reason


def test_more_memory_stops_at_the_largest_node() -> None:
    """Growing memory past the largest node restarts elsewhere instead."""
    decision = recovery_decision(
        kind="oom",
        earlier=0,
        failures=0,
        failure=failure("oom"),
        request=Resources.of(cores=1, memory="64GiB"),
        largest_memory=64 * 2**30,
        settings=CONFIG.recovery,
    )
    assert decision.resources is None
    assert decision.avoid_node == "n1"


def test_reliability_falls_with_failures_and_recovers_with_time() -> None:
    """Two recent failures put a node below 0.6 (avoided); a week halves their weight."""
    nodes = NodeReliability(half_life=7 * 86400.0)
    assert nodes.score("n1", T0) == 1.0
    nodes.failed("n1", T0)
    assert nodes.score("n1", T0) == pytest.approx(math.exp(-1 / 3))
    nodes.failed("n1", T0)
    assert nodes.score("n1", T0) < CONFIG.recovery.avoid_below
    assert nodes.score("n1", T0 + timedelta(days=7)) == pytest.approx(math.exp(-1 / 3))


# -- scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"accuracy": 0.9}, 0.9),
        ({"accuracy": 1.0, "convergence": 0.5}, 0.75),
        ({"accuracy": 1.0, "novelty": 0.0}, 1.0 / 1.5),
        ({"residual": 3.0}, None),
        ({"accuracy": math.nan, "stability": 0.4}, 0.4),
    ],
)
def test_score_is_the_weighted_mean_of_the_criteria_reported(
    metrics: dict[str, float], expected: float | None
) -> None:
    """Only the criteria reported count, weighted (novelty 0.5 by default)."""
    found = score(metrics, CONFIG.scenarios.weights)
    assert found == (pytest.approx(expected) if expected is not None else None)


def members(quality: dict[str, float], reached: dict[str, float]) -> list[Member]:
    return [
        Member(
            job_id=j, scores=tuple((f, quality[j]) for f in (1 / 9, 1 / 3, 1.0) if f <= reached[j])
        )
        for j in quality
    ]


def test_halving_keeps_the_top_third_at_each_rung() -> None:
    """Nine members: after rung 1 the best three go on, after rung 2 the best one."""
    quality = {f"m{k}": k / 10 for k in range(9)}
    everyone_at_rung_one = members(quality, dict.fromkeys(quality, 1 / 9))
    first = halving(everyone_at_rung_one, (1 / 9, 1 / 3), 3)
    assert set(first.pruned) == {f"m{k}" for k in range(6)}
    assert first.rungs_passed == 1
    assert {j for j, n in first.survived.items() if n == 1} == {"m6", "m7", "m8"}
    reached = {j: (1 / 3 if j in ("m6", "m7", "m8") else 1 / 9) for j in quality}
    second = halving(members(quality, reached), (1 / 9, 1 / 3), 3)
    assert second.rungs_passed == 2
    assert second.survived["m8"] == 2
    assert "m7" in second.pruned
    assert "cutoff 0.800" in second.pruned["m7"]


def test_members_wait_at_a_rung_until_the_sweep_is_there_and_pins_survive() -> None:
    """A rung is decided only when every live member reached it; a pinned member survives
    whatever its score; a failed member does not hold the sweep back."""
    quality = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.3}
    reached = {"a": 1 / 9, "b": 1 / 9, "c": 0.0, "d": 1 / 9}
    pending = halving(members(quality, reached), (1 / 9,), 2)
    assert set(pending.waiting) == {"a", "b", "d"}
    assert not pending.pruned
    live = [*members({k: quality[k] for k in "abd"}, reached), Member(job_id="c", failed=True)]
    pinned = [
        Member(job_id=m.job_id, scores=m.scores, pinned=m.job_id == "b", failed=m.failed)
        for m in live
    ]
    decided = halving(pinned, (1 / 9,), 2)
    assert set(decided.pruned) == {"d"}  # keep 1 of 3 (a), plus the pinned b
    assert decided.survived["b"] == 1
