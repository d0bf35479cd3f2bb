"""``taskfarm science ...`` as a user runs it: forecasts and reports from a real SQLite journal,
and clear errors for what is wrong."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from science_usage import write_usage_store

from actors import ENGINE_CODEC, AttemptSpec, Resources, open_engine, open_simulated_executor
from actors.cluster import usage_store_path
from domains.scientific import SCIENCE_CODEC, SciencePolicy, Simulation, SimulationStage
from persistence import EventCodec, open_sqlite_journal
from runtime import VirtualClock


async def taskfarm(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "runtime.cli", *args], check=False, cwd=None
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def write_journal(path: Path, days: int = 28) -> None:
    """A science cluster's journal: two projects, a simulation each per day, on real SQLite."""
    clock = VirtualClock(auto_advance=True, start=datetime(2027, 3, 1, tzinfo=UTC))
    codec = EventCodec()
    codec.update(ENGINE_CODEC)
    codec.update(SCIENCE_CODEC)

    def duration(spec: AttemptSpec) -> float:
        return 3600.0 * float(spec.env.get("HOURS", "1"))

    async with (
        open_sqlite_journal(path, clock=clock, codec=codec, synchronous="OFF") as journal,
        open_simulated_executor(duration=duration, clock=clock) as executor,
        open_engine(journal=journal, clock=clock, policy=SciencePolicy()) as engine,
    ):
        await engine.add_node("n1", Resources.of(cores=16, memory="8GiB"), executor=executor)
        for day in range(days):
            jobs = [
                Simulation(
                    name=f"{project}-{day}",
                    owner="o",
                    project=project,
                    stages=[
                        SimulationStage(
                            name="run",
                            command=["x"],
                            cores=cores,
                            env={"HOURS": str(hours + day % 7)},
                        )
                    ],
                ).to_job()
                for project, cores, hours in (("climate", 8, 6), ("ocean", 4, 2))
            ]
            await engine.submit(jobs)
            for job in jobs:
                await engine.wait_job(job.job_id)
            midnight = clock.now().replace(hour=0, minute=0, second=0) + timedelta(days=1)
            await clock.sleep((midnight - clock.now()).total_seconds())


@pytest.mark.slow
async def test_forecast_and_report_from_a_journal_file(tmp_path: Path) -> None:
    """``forecast`` prints each series' method and accuracy and writes CSV and a chart;
    ``report`` writes report.csv, report.json, report.png and report.svg."""
    journal = tmp_path / "taskfarm.db"
    await write_journal(journal)
    code, out, err = await taskfarm(
        "science",
        "forecast",
        "--journal",
        str(journal),
        "--horizon",
        "14",
        "--csv",
        str(tmp_path / "forecast.csv"),
        "--chart",
        str(tmp_path / "forecast.svg"),
    )
    assert code == 0, err
    assert "climate:" in out
    assert "backtest WAPE" in out
    assert ", MAPE " in out
    assert "core-h allocated (no usage store)" in out
    rows = (tmp_path / "forecast.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "series,day,core_hours,low80,high80,method"
    assert len(rows) == 1 + 3 * 14  # the cluster and two projects, 14 days each
    assert b"<svg" in (tmp_path / "forecast.svg").read_bytes()[:500]
    code, out, err = await taskfarm(
        "science", "forecast", "--journal", str(journal), "--project", "ocean", "--json"
    )
    assert code == 0, err
    document = json.loads(out)
    assert [s["series"] for s in document["series"]] == ["ocean"]
    assert document["series"][0]["method"] in (
        "seasonal_naive",
        "exponential_smoothing",
        "linear_trend",
        "queue_and_arrivals",
    )
    backtest = document["series"][0]["backtest"]
    assert set(backtest["queue_and_arrivals"]) == {
        "wape",
        "weekly_wape",
        "mape",
        "mae",
        "coverage80",
    }
    code, out, err = await taskfarm(
        "science",
        "report",
        "--journal",
        str(journal),
        "--out",
        str(tmp_path / "report"),
        "--node-cores",
        "16",
    )
    assert code == 0, err
    for name in ("report.csv", "report.json", "report.png", "report.svg"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name


@pytest.mark.slow
async def test_forecast_and_report_read_measured_usage_beside_the_journal(tmp_path: Path) -> None:
    """With the coordinator's usage store beside the journal, ``forecast`` and ``report`` show
    measured CPU core-hours beside the allocated ones, per project (jobs mapped by the
    journal); the forecast itself stays on allocations."""
    journal = tmp_path / "taskfarm.db"
    await write_journal(journal, days=21)
    code, out, err = await taskfarm("science", "forecast", "--journal", str(journal), "--json")
    assert code == 0, err
    without = json.loads(out)
    assert all(s["measured_core_hours"] is None for s in without["series"])
    await write_usage_store(usage_store_path(journal))  # climate-0: 5 CPU-hours on day 0
    code, out, err = await taskfarm("science", "forecast", "--journal", str(journal))
    assert code == 0, err
    assert "climate:" in out
    assert ", 5 measured (CPU)" in out
    code, out, err = await taskfarm("science", "forecast", "--journal", str(journal), "--json")
    assert code == 0, err
    document = json.loads(out)
    series = {s["series"]: s for s in document["series"]}
    assert series["climate"]["measured_core_hours"] == 5.0
    assert series["ocean"]["measured_core_hours"] == 0.0
    assert series["(cluster)"]["measured_core_hours"] == 6.0
    assert series["climate"]["allocated_core_hours"] > 100
    assert document["forecast"] == without["forecast"]  # forecast on allocations, unchanged
    (first,) = [r for r in document["history"] if r["series"] == "climate"][:1]
    assert first["measured_core_hours"] == 5.0
    code, out, err = await taskfarm(
        "science", "report", "--journal", str(journal), "--out", str(tmp_path / "r"), "--json"
    )
    assert code == 0, err
    march = [r for r in json.loads(out) if r["kind"] == "used" and r["month"] == "2027-03"]
    measured = {r["project"]: r["measured_node_hours"] for r in march}
    assert measured == {"(cluster)": 6.0, "climate": 5.0, "ocean": 0.0}
    header = (tmp_path / "r" / "report.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("project,month,node_hours,kind,measured_node_hours")


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (("science", "forecast", "--journal", "/nonexistent/taskfarm.db"), "--journal"),
        (
            (
                "science",
                "reserve",
                "--for",
                "s",
                "--start",
                "2027-01-01T00:00Z",
                "--duration",
                "1d",
            ),
            "--nodes",
        ),
    ],
)
async def test_a_bad_science_command_names_what_is_wrong(args: tuple[str, ...], where: str) -> None:
    """A missing journal or a reservation without nodes is one clear line, no traceback."""
    code, _out, err = await taskfarm(*args)
    assert code != 0
    assert where in err
    assert "Traceback" not in err
