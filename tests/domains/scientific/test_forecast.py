"""Forecasting: each method on series with a known answer, backtesting and its accuracy,
allocated usage from the journal, and the report files."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from science_usage import write_usage_store

from actors import ENGINE_CODEC, AttemptSpec, Resources, open_engine, open_simulated_executor
from domains.scientific import Simulation, SimulationStage, parse_cluster_config
from domains.scientific._cli import (
    forecast_rows,
    history_rows,
    report_table,
    usage_forecasts,
    write_report,
)
from domains.scientific._forecast import (
    accuracy,
    backtest,
    backtest_informed,
    forecast_series,
    linear_trend,
    seasonal_naive,
    wape,
    weekly_wape,
)
from domains.scientific._usage import CLUSTER, read_measured, read_usage
from persistence import InMemoryJournal
from runtime import ConfigurationError, VirtualClock


def seasonal(
    days: int, *, level: float = 1000.0, trend: float = 8.0, noise: float = 0.02
) -> list[float]:
    """Weekday-heavy usage that grows, with seeded noise: the shape of a cluster's week."""
    rng = random.Random(11)
    week = [1.15, 1.2, 1.2, 1.15, 1.05, 0.6, 0.65]
    return [(level + trend * t) * week[t % 7] * (1 + rng.gauss(0, noise)) for t in range(days)]


@pytest.mark.parametrize(
    ("history", "horizon", "expected"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], 3, [2.0, 3.0, 4.0]),  # the same weekday last week
        ([5.0, 6.0], 2, [6.0, 6.0]),  # less than a season: the last value
        ([], 2, [0.0, 0.0]),
    ],
)
def test_seasonal_naive_table(history: list[float], horizon: int, expected: list[float]) -> None:
    """Seasonal naive repeats the last week."""
    assert seasonal_naive(history, horizon, 7) == expected


def test_linear_trend_extends_a_line_exactly_and_never_below_zero() -> None:
    """A straight line is forecast exactly; a falling one stops at zero."""
    assert linear_trend([3.0 + 2 * t for t in range(10)], 3, 7) == pytest.approx([23.0, 25.0, 27.0])
    assert linear_trend([30.0 - 10 * t for t in range(4)], 3, 7)[-1] == 0.0


def test_accuracy_table() -> None:
    """MAPE skips days without usage; MAE does not."""
    mape, mae = accuracy([100.0, 200.0, 0.0], [110.0, 180.0, 5.0])
    assert mape == pytest.approx(10.0)
    assert mae == pytest.approx(35.0 / 3)


@pytest.mark.parametrize(
    ("actual", "predicted", "expected"),
    [
        ([100.0, 200.0, 0.0], [110.0, 180.0, 5.0], 100 * 35 / 300),  # zero days still count
        ([1.0, 100.0], [10.0, 100.0], 100 * 9 / 101),  # a 900 % day weighs by its volume
        ([5.0, 5.0], [5.0, 5.0], 0.0),
        ([0.0, 0.0], [3.0, 0.0], math.nan),  # nothing used: undefined, not a crash
        ([0.0, 0.0], [0.0, 0.0], math.nan),
        ([], [], math.nan),
    ],
)
def test_wape_table(actual: list[float], predicted: list[float], expected: float) -> None:
    """WAPE is the sum of absolute errors over the sum of actuals, NaN when nothing was used."""
    found = wape(actual, predicted)
    if math.isnan(expected):
        assert math.isnan(found)
    else:
        assert found == pytest.approx(expected)


def test_weekly_wape_scores_complete_weeks_only() -> None:
    """Errors that cancel within a week vanish from the weekly score; a trailing partial week
    is left out; less than a week, or an empty window, is undefined (NaN)."""
    actual = [10.0, 20.0] * 7  # two weeks
    shifted = [20.0, 10.0] * 7  # right totals only over an even number of days
    assert wape(actual, shifted) == pytest.approx(100 * 140 / 210)
    week_totals = (sum(actual[:7]), sum(actual[7:]))
    assert week_totals == (100.0, 110.0)
    assert weekly_wape(actual, shifted) == pytest.approx(100 * 20 / 210)
    assert weekly_wape([*actual, 1000.0], [*shifted, 0.0]) == weekly_wape(actual, shifted)
    assert math.isnan(weekly_wape(actual[:6], shifted[:6]))
    assert math.isnan(weekly_wape([0.0] * 7, [1.0] * 7))
    with pytest.raises(ValueError, match="length"):
        weekly_wape([1.0] * 7, [1.0] * 6)


def _pattern(day: int) -> float:
    """A week of six busy days and one nearly empty one."""
    return 1.0 if day % 7 == 0 else 100.0


def test_the_method_is_chosen_by_wape_not_mape() -> None:
    """A method right on the near-empty days but 40 % low on the busy ones wins on MAPE; one
    right on the busy days but 10x too high on the near-empty one wins on WAPE, and is
    chosen; every score is reported."""
    history = [_pattern(t) for t in range(42)]

    def small_right(origin: int, horizon: int) -> list[float]:
        return [1.0 if _pattern(d) == 1.0 else 60.0 for d in range(origin, origin + horizon)]

    def busy_right(origin: int, horizon: int) -> list[float]:
        return [10.0 if _pattern(d) == 1.0 else 100.0 for d in range(origin, origin + horizon)]

    chosen = forecast_series(
        "lumpy",
        history,
        horizon=7,
        methods=[],
        informed={"small_right": small_right, "busy_right": busy_right},
    )
    small, busy = chosen.accuracies["small_right"], chosen.accuracies["busy_right"]
    assert small.mape < busy.mape
    assert busy.wape < small.wape
    assert busy.wape == pytest.approx(100 * 9 / 601)
    assert busy.weekly_wape == pytest.approx(100 * 9 / 601)
    assert chosen.method == "busy_right"
    assert list(chosen.forecast) == [10.0 if d % 7 == 0 else 100.0 for d in range(42, 49)]


def test_an_informed_method_is_backtested_from_each_origin_then_run_from_the_end() -> None:
    """An informed method is asked for each backtest origin (a week apart, before the end)
    and, for the forecast, from the end of the history."""
    history = [float(t % 7) for t in range(40)]
    asked: list[tuple[int, int]] = []

    def exact(origin: int, horizon: int) -> list[float]:
        asked.append((origin, horizon))
        return [float(d % 7) for d in range(origin, origin + horizon)]

    found, errors = backtest_informed(history, exact, season=7, origins=3, horizon=14)
    assert asked == [(12, 14), (19, 14), (26, 14)]
    assert found.wape == 0.0
    assert found.mae == 0.0
    assert errors == [[0.0] * 14] * 3
    asked.clear()
    chosen = forecast_series("exact", history, horizon=5, informed={"exact": exact})
    assert asked[-1] == (40, 5)
    assert chosen.method == "exact"
    with pytest.raises(ValueError, match="at least one method"):
        forecast_series("none", history, horizon=5, methods=[])


def test_on_a_trending_weekly_series_smoothing_wins_and_is_accurate() -> None:
    """Trained on 60 days of a growing weekly series, the chosen method forecasts days
    61-90 within 5 % MAPE, at least 20 % better than weekly seasonal naive."""
    series = seasonal(90)
    train, test = series[:60], series[60:]
    chosen = forecast_series("cluster", train, horizon=30)
    assert chosen.method == "exponential_smoothing"
    mape, _ = accuracy(test, list(chosen.forecast))
    naive, _ = accuracy(test, seasonal_naive(train, 30, 7))
    assert mape < 5.0
    assert mape <= 0.8 * naive
    assert all(
        lo <= f <= hi for lo, f, hi in zip(chosen.lower, chosen.forecast, chosen.upper, strict=True)
    )


def test_backtesting_picks_the_right_method_per_series() -> None:
    """A pure weekly pattern goes to seasonal naive (exact); a noisy line to the linear
    trend or smoothing, never to the naive week."""
    week = [float(v) for v in (5, 9, 9, 9, 9, 2, 1)] * 10
    exact = forecast_series("weekly", week, horizon=14)
    assert exact.accuracies["seasonal_naive"].mape == pytest.approx(0.0)
    assert exact.method in ("seasonal_naive", "exponential_smoothing")
    assert list(exact.forecast[:7]) == pytest.approx([5, 9, 9, 9, 9, 2, 1], abs=0.5)
    rng = random.Random(3)
    line = [100 + 5 * t + rng.gauss(0, 1) for t in range(70)]
    trend = forecast_series("line", line, horizon=14)
    assert trend.method != "seasonal_naive"
    assert trend.accuracies[trend.method].mape < trend.accuracies["seasonal_naive"].mape


def test_the_interval_covers_about_eighty_percent_out_of_sample() -> None:
    """Coverage is measured at each origin with the other origins' errors only."""
    series = seasonal(120, noise=0.08)
    found, errors = backtest(series, seasonal_naive, season=7, origins=8, horizon=7, level=0.8)
    assert len(errors) == 8
    assert found.coverage is not None
    assert 0.55 <= found.coverage <= 0.95


_SIMULATED: list[InMemoryJournal] = []


async def simulate_usage() -> InMemoryJournal:
    """Two projects on a farm for 30 days: climate runs 10 h stages, ocean 2 h ones (run
    once, then read by each test: the journal is only read)."""
    if not _SIMULATED:
        _SIMULATED.append(await _simulate())
    return _SIMULATED[0]


async def _simulate() -> InMemoryJournal:
    clock = VirtualClock(auto_advance=True, start=datetime(2027, 3, 1, tzinfo=UTC))
    journal = InMemoryJournal(clock=clock, codec=ENGINE_CODEC)

    def duration(spec: AttemptSpec) -> float:
        return 3600.0 * float(spec.env.get("HOURS", "1"))

    async with (
        open_simulated_executor(duration=duration, clock=clock) as executor,
        open_engine(journal=journal, clock=clock) as engine,
    ):
        await engine.add_node("n1", Resources.of(cores=8, memory="8GiB"), executor=executor)
        for day in range(30):
            sims = [
                Simulation(
                    name=f"{project}-{day}",
                    owner="o",
                    project=project,
                    stages=[
                        SimulationStage(
                            name="run", command=["x"], cores=cores, env={"HOURS": hours}
                        )
                    ],
                ).to_job()
                for project, cores, hours in (("climate", 4, "10"), ("ocean", 2, "2"))
            ]
            await engine.submit(sims)
            for job in sims:
                await engine.wait_job(job.job_id)
            midnight = clock.now().replace(hour=0, minute=0, second=0) + timedelta(days=1)
            await clock.sleep((midnight - clock.now()).total_seconds())
    return journal


async def test_usage_is_core_hours_per_project_per_day_from_the_journal() -> None:
    """Each attempt counts cores x hours on the days it ran, per project and in all."""
    journal = await simulate_usage()
    usage = await read_usage(journal)
    assert usage.projects() == ["climate", "ocean"]
    climate = usage.series("climate")
    ocean = usage.series("ocean")
    assert climate[0] == pytest.approx(40.0)  # 4 cores x 10 h
    assert ocean[0] == pytest.approx(4.0)  # 2 cores x 2 h
    assert usage.series(CLUSTER)[0] == pytest.approx(44.0)
    assert sum(climate) == pytest.approx(30 * 40.0)
    months = usage.monthly("climate", per_node_cores=8)
    assert sum(months.values()) == pytest.approx(30 * 40.0 / 8)


async def test_the_report_writes_csv_json_and_charts(tmp_path: Path) -> None:
    """The capacity report has used and forecast months per project in CSV and JSON, and a
    PNG and an SVG chart."""
    journal = await simulate_usage()
    usage = await read_usage(journal)
    config = parse_cluster_config("[forecast]\nmin_history_days = 21")
    forecasts = usage_forecasts(usage, config, horizon=200)
    rows = report_table(usage, forecasts, node_cores=8, months=6)
    write_report(tmp_path, usage, forecasts, rows, months=6)
    lines = (tmp_path / "report.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("project,month,node_hours,kind")
    kinds = {(r["project"], r["kind"]) for r in rows}
    assert ("climate", "forecast") in kinds
    assert ("ocean", "used") in kinds
    assert sum(r["kind"] == "forecast" and r["project"] == "climate" for r in rows) == 6
    summary = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert {s["series"] for s in summary["series"]} == {CLUSTER, "climate", "ocean"}
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "report.svg").read_bytes()[:500]
    daily = forecast_rows(usage, forecasts)
    assert daily[0]["day"] == (usage.days()[-1] + timedelta(days=1)).isoformat()


async def test_too_little_history_is_refused_naming_the_setting() -> None:
    """A forecast needs min_history_days of usage; fewer is a clear error."""
    journal = await simulate_usage()
    usage = await read_usage(journal)
    strict = parse_cluster_config("[forecast]\nmin_history_days = 60")
    with pytest.raises(ConfigurationError, match="min_history_days"):
        usage_forecasts(usage, strict, horizon=7)
    with pytest.raises(ConfigurationError, match="no usage for project"):
        usage_forecasts(usage, parse_cluster_config(""), horizon=7, projects=["nope"])


async def test_measured_usage_is_read_from_a_usage_store_beside_the_allocations(
    tmp_path: Path,
) -> None:
    """Measured CPU core-hours come per project per day from a real usage store file: hours,
    plus the minutes not rolled up yet (never both), each job under its journal's project;
    the report puts them beside the allocated node-hours and the forecast stays on
    allocations."""
    journal = await simulate_usage()
    usage = await read_usage(journal)
    assert usage.measured is None
    assert usage.measured_series("climate") is None
    allocated = usage.series(CLUSTER)
    store = tmp_path / "taskfarm.usage.db"
    await write_usage_store(store)
    await read_measured(store, usage)
    climate = usage.measured_series("climate")
    assert climate is not None
    assert climate[0] == pytest.approx(4.0 + 1.0)  # the hour, then the unrolled half hour
    assert sum(climate) == pytest.approx(5.0)
    assert usage.measured_series("ocean") == [0.0] * 30
    assert usage.measured_series("default") == [1.0] + [0.0] * 29  # not in the journal
    assert usage.measured_series(CLUSTER) == pytest.approx([6.0] + [0.0] * 29)
    assert usage.series(CLUSTER) == allocated  # allocations unchanged
    config = parse_cluster_config("[forecast]\nmin_history_days = 21")
    forecasts = usage_forecasts(usage, config, horizon=40)
    rows = report_table(usage, forecasts, node_cores=8, months=2)
    used = {(r["project"], r["month"]): r for r in rows if r["kind"] == "used"}
    assert used[("climate", "2027-03")]["node_hours"] == pytest.approx(30 * 40.0 / 8)
    assert used[("climate", "2027-03")]["measured_node_hours"] == pytest.approx(5.0 / 8, abs=0.05)
    assert all("measured_node_hours" not in r for r in rows if r["kind"] == "forecast")
    history = [r for r in history_rows(usage, forecasts) if r["series"] == "climate"]
    assert history[0] == {
        "series": "climate",
        "day": "2027-03-01",
        "allocated_core_hours": pytest.approx(40.0),
        "measured_core_hours": pytest.approx(5.0),
    }
