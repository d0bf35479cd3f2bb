"""The queue and arrivals forecast: the queue's known work laid out by estimates, dependencies
and widths, and expected arrivals from the submissions' empirical kernel, on hand-built
journals with known answers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from actors import (
    JobFinished,
    JobPaused,
    JobReopened,
    JobSubmitted,
    TaskAssigned,
    TaskCompleted,
    TaskFailed,
    TaskRequeued,
    TaskStarted,
)
from domains.scientific import Simulation, SimulationStage, parse_cluster_config
from domains.scientific._cli import usage_forecasts
from domains.scientific._usage import CLUSTER, Usage, daily_usage
from persistence import Event, RecordedEvent
from runtime import ConfigurationError

DAY0 = datetime(2027, 3, 1, tzinfo=UTC)  # a Monday


def at(day: float, hour: float = 0.0) -> datetime:
    """The moment ``hour`` o'clock on day ``day`` (day 0 is DAY0)."""
    return DAY0 + timedelta(days=day, hours=hour)


class Journal:
    """Builds journal records in time order, as the engine would have written them."""

    def __init__(self) -> None:
        self.records: list[tuple[datetime, str, Event]] = []

    def add(self, when: datetime, job: str, event: Event) -> None:
        """Record ``event`` of ``job`` at ``when``."""
        self.records.append((when, f"job:{job}", event))

    def submit(self, when: datetime, simulation: Simulation) -> None:
        """Record a simulation's submission."""
        self.add(when, simulation.name, JobSubmitted(job=simulation.to_job(), submitted_at=when))

    def run(
        self,
        job: str,
        task: int,
        start: datetime,
        end: datetime | None = None,
        *,
        nodes: int = 1,
        requeued: bool = False,
        token: int = 1,
    ) -> None:
        """Record an attempt from ``start`` to ``end`` (still running without one)."""
        gang = tuple(f"n{k}" for k in range(nodes))
        self.add(
            start,
            job,
            TaskAssigned(task=task, attempt=1, token=token, node=gang[0], nodes=gang),
        )
        self.add(start, job, TaskStarted(task=task, token=token))
        if end is not None:
            ended: Event = (
                TaskRequeued(task=task, token=token, reason="lost", lost=True)
                if requeued
                else TaskCompleted(task=task, token=token)
            )
            self.add(end, job, ended)

    def usage(self, until: datetime | None = None) -> Usage:
        """Fold the records before ``until`` (all without it), in time order."""
        ordered = sorted(self.records, key=lambda r: r[0])
        records = [
            RecordedEvent(k + 1, stream, 1, "", 1, when, None, event)
            for k, (when, stream, event) in enumerate(ordered)
            if until is None or when < until
        ]
        return daily_usage(records)


def stage(name: str, **fields: object) -> SimulationStage:
    """A stage running ``model``."""
    return SimulationStage(name=name, command=["model"], **fields)  # type: ignore[arg-type]


def simulation(name: str, project: str, *stages: SimulationStage) -> Simulation:
    """A simulation of ``project``."""
    return Simulation(name=name, owner="o", project=project, stages=list(stages))


def test_the_queue_is_laid_out_by_estimates_dependencies_and_widths() -> None:
    """A running 2-node stage counts its cores x nodes for what is left of its estimate (all
    its attempts' time counted, since a restart resumes), its dependant follows for its
    walltime times the share of their walltime finished stages ran, and a simulation not
    started yet follows the usual queue wait; projects are kept apart."""
    journal = Journal()
    # Finished: ran 5 h of a 10 h walltime, started at once (the share 0.5, the wait 0).
    journal.submit(at(0), simulation("done", "climate", stage("x", cores=1, walltime="10h")))
    journal.run("done", 0, at(0), at(0, 5))
    journal.submit(
        at(0, 17),
        simulation(
            "sim",
            "climate",
            stage("a", cores=4, nodes=2, estimate="10h", walltime="13h"),
            stage("b", cores=4, walltime="10h", after=["a"]),
        ),
    )
    journal.run("sim", 0, at(0, 17), at(0, 19), nodes=2, requeued=True)  # 2 h, then lost
    journal.run("sim", 0, at(0, 22), nodes=2, token=2)  # 2 h more by midnight
    # Submitted just before midnight, not started: a day's work of 16 cores, tomorrow.
    journal.submit(
        at(0, 23), simulation("next", "ocean", stage("o", cores=16, nodes=1, estimate="1d"))
    )
    usage = journal.usage()
    days = [at(1).date(), at(2).date()]
    ledger = usage.ledger
    # a: 10 h - 4 h run = 6 h x 8 cores; b: 5 h x 4 cores after it.
    assert ledger.known("climate", at(1), days) == pytest.approx([48.0 + 20.0, 0.0])
    # o: 16 cores from midnight (the wait is 0) for 24 h.
    assert ledger.known("ocean", at(1), days) == pytest.approx([16 * 24.0, 0.0])
    assert ledger.known(None, at(1), days) == pytest.approx([68.0 + 384.0, 0.0])
    # Seen from 18:00 on day 0, with what was journaled by then: a had run 1 h of its
    # first attempt, so 9 h were left, 6 of them on day 0.
    assert ledger.known("climate", at(0, 18), [at(0).date()]) == pytest.approx([0.0 + 6 * 8.0])


def test_held_and_paused_work_is_not_counted() -> None:
    """A stage ready for longer than ``stale`` days without starting is held (an operator or
    a policy's pruning keeps it) and does not count, nor do the stages after it; a paused
    simulation does not count either."""
    journal = Journal()
    journal.submit(
        at(0),
        simulation(
            "pruned",
            "chem",
            stage("rung0", cores=1, estimate="2h"),
            stage("rung1", cores=1, estimate="4h", after=["rung0"]),
            stage("rung2", cores=1, estimate="8h", after=["rung1"]),
        ),
    )
    journal.run("pruned", 0, at(0), at(0, 2))
    journal.submit(at(9), simulation("paused", "chem", stage("p", cores=8, estimate="5d")))
    journal.run("paused", 0, at(9))
    journal.add(at(9, 12), "paused", JobPaused(mode="checkpoint"))
    usage = journal.usage()
    days = [at(10).date()]
    assert usage.ledger.known("chem", at(10), days) == [0.0]
    # Within the stale limit the pruned member's next rungs still count (4 h then 8 h).
    assert usage.ledger.known("chem", at(10), days, stale=30.0) == pytest.approx([12.0])
    # Before its pause the paused one counted: 8 cores all day.
    assert usage.ledger.known("chem", at(9, 6), [at(10).date()]) == pytest.approx([8 * 24.0])


def daily_runs(days: int) -> Journal:
    """A simulation submitted every midnight, running 1 core from noon for a day."""
    journal = Journal()
    for day in range(days):
        name = f"d{day}"
        journal.submit(at(day), simulation(name, "ocean", stage("s", cores=1, estimate="1d")))
        journal.run(name, 0, at(day, 12), at(day + 1, 12) if day < days - 1 else None)
    return journal


def test_arrivals_expect_a_days_submissions_kernel_at_every_age() -> None:
    """Each day's submissions use 12 core-hours on their day and 12 the next: a forecast
    from midnight expects the queue's 12 plus 12 from tomorrow's submissions, then 24 a day
    (arrivals x size), exactly what the days used."""
    usage = daily_runs(30).usage()
    ledger = usage.ledger
    days = [at(20 + k).date() for k in range(4)]
    assert ledger.known("ocean", at(20), days) == pytest.approx([12.0, 0.0, 0.0, 0.0])
    assert usage.first is not None
    arrivals = ledger.arrivals("ocean", at(20), days, first=usage.first)
    assert arrivals == pytest.approx([12.0, 24.0, 24.0, 24.0])
    assert usage.queue_and_arrivals("ocean", 20, 4) == pytest.approx([24.0] * 4)
    assert usage.series("ocean")[20:24] == pytest.approx([24.0] * 4)
    # Other projects have neither queue nor arrivals; the cluster is the sum.
    assert usage.queue_and_arrivals("ice", 20, 2) == [0.0, 0.0]
    assert usage.queue_and_arrivals(CLUSTER, 20, 2) == pytest.approx([24.0, 24.0])


def test_the_product_forecast_backtests_and_runs_the_queue_method_from_now() -> None:
    """``usage_forecasts`` (what ``taskfarm science forecast`` and ``report`` print) backtests
    the queue and arrivals method beside the others and, from the last event, forecasts the
    running simulation's rest plus the arrivals."""
    usage = daily_runs(30).usage()
    config = parse_cluster_config("[forecast]\nmin_history_days = 21")
    (forecast,) = usage_forecasts(usage, config, horizon=3, projects=["ocean"])
    queue = forecast.accuracies["queue_and_arrivals"]
    assert queue.origins == 2  # a week apart, 10 days each, within 30 days of history
    # The history's last day is partial (the last event is at noon), so no method is exact.
    others = [forecast.accuracies[m] for m in ("exponential_smoothing", "linear_trend")]
    assert all(queue.wape < other.wape for other in others)
    assert queue.wape <= forecast.accuracies["seasonal_naive"].wape
    # From now: the running simulation's last 12 core-hours and tomorrow's arrivals, then 24.
    assert usage.queue_and_arrivals("ocean", len(usage.days()), 3) == pytest.approx([24.0] * 3)
    assert list(forecast.forecast) == pytest.approx([24.0] * 3)


def test_the_history_runs_to_the_last_event_so_todays_submissions_count() -> None:
    """A day without usage at the end of the journal is still history: the forecast starts
    after the last event's day and sees what was submitted on it."""
    journal = Journal()
    journal.submit(at(0), simulation("a", "land", stage("s", cores=2, estimate="1d")))
    journal.run("a", 0, at(0), at(1))
    journal.submit(at(3, 9), simulation("b", "land", stage("s", cores=4, estimate="2d")))
    usage = journal.usage()
    assert usage.last == at(3).date()
    assert usage.series("land") == pytest.approx([48.0, 0.0, 0.0, 0.0])
    ahead = usage.queue_and_arrivals("land", len(usage.days()), 3)
    # b: 4 cores from 09:00 on day 3 (a started at once: no wait) for 48 h, 24 of them on
    # day 4 and 9 on day 5; arrivals: a's 48 core-hours on its day, over the 3 complete days
    # of submissions (none of them used anything a day or more later).
    assert ahead == pytest.approx([96.0 + 16.0, 36.0 + 16.0, 16.0], abs=0.01)


def test_the_queue_settings_are_read_from_cluster_toml_and_checked() -> None:
    """``[forecast]`` sets the arrival window and the stale limit; a bad one names its key."""
    config = parse_cluster_config("[forecast]\narrival_window_days = 14\nqueue_stale_days = 2.5")
    assert config.forecast.arrival_window_days == 14
    assert config.forecast.queue_stale_days == 2.5
    with pytest.raises(ConfigurationError, match=r"forecast\.queue_stale_days"):
        parse_cluster_config("[forecast]\nqueue_stale_days = 0")
    with pytest.raises(ConfigurationError, match=r"forecast\.arrival_window_days"):
        parse_cluster_config("[forecast]\narrival_window_days = 0")


def test_a_reopened_simulation_is_queued_again() -> None:
    """A simulation retried after it failed (``taskfarm retry``) is back in the queue."""
    journal = Journal()
    journal.submit(at(0), simulation("r", "ice", stage("s", cores=2, estimate="10h")))
    journal.add(at(0, 1), "r", TaskFailed(task=0, token=1, outcome="failed"))
    journal.add(at(0, 1), "r", JobFinished(outcome="failed", finished_at=at(0, 1)))
    finished = journal.usage()
    assert finished.ledger.known("ice", at(0, 2), [at(0).date()]) == [0.0]
    journal.add(at(0, 3), "r", JobReopened(tasks=(0,)))
    reopened = journal.usage()
    assert reopened.ledger.known("ice", at(0, 4), [at(0).date()]) == pytest.approx([2 * 10.0])
    # Seen from before the retry, it was over (what a backtest from then knew).
    assert reopened.ledger.known("ice", at(0, 2), [at(0).date()]) == [0.0]


@pytest.mark.parametrize(("window", "expected"), [(28, 18.0), (20, 18.0), (10, 24.0), (5, 24.0)])
def test_arrivals_are_learned_from_the_latest_window_days(window: int, expected: float) -> None:
    """The kernel averages the ``window`` latest submission days (never before the first):
    ten days of 12 core-hours, then ten of 24, expect 18 over all twenty and 24 over the last
    ten or fewer."""
    journal = Journal()
    for day in range(20):
        name = f"j{day}"
        cores = 1 if day < 10 else 2
        journal.submit(at(day), simulation(name, "ice", stage("s", cores=cores, estimate="12h")))
        journal.run(name, 0, at(day), at(day, 12))
    usage = journal.usage()
    assert usage.first is not None
    days = [at(20).date(), at(21).date()]
    arrivals = usage.ledger.arrivals("ice", at(20), days, first=usage.first, window=window)
    assert arrivals == pytest.approx([expected, expected])
