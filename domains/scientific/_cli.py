"""``taskfarm science ...``: the scientific domain's commands.

Reservations, maintenance windows, pins and the scenario ranking are policy commands sent to
the coordinator (journaled there in ``policy:science``); ``forecast`` and ``report`` read a
journal file (read-only, so they run beside a live coordinator or on a copy) and, when there
is one beside it, the coordinator's usage store (``<journal>.usage.db``) for measured usage.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from actors import ENGINE_CODEC, cli
from actors.cluster import usage_store_path
from persistence import EventCodec, open_sqlite_journal
from runtime import ConfigurationError, SystemClock

from ._config import ClusterConfig, ForecastSettings, load_cluster_config
from ._events import SCIENCE_CODEC
from ._forecast import Informed, SeriesForecast, forecast_series
from ._usage import CLUSTER, Usage, read_measured, read_usage

__all__ = [
    "configure",
    "forecast_rows",
    "history_rows",
    "report_table",
    "usage_forecasts",
    "write_report",
]

PolicyArguments = dict[str, Any]


def configure(parser: argparse.ArgumentParser) -> None:
    """Add ``science``'s subcommands."""
    commands = parser.add_subparsers(dest="science_command", metavar="COMMAND", required=True)

    reserve = _remote(commands, "reserve", "hold nodes for a simulation from a time")
    reserve.add_argument("--for", dest="job", required=True, help="the simulation (job id)")
    reserve.add_argument("--start", required=True, help="ISO time with offset (2027-03-01T08:00Z)")
    reserve.add_argument("--duration", required=True, help="e.g. 2d, 36h")
    reserve.add_argument("--nodes", type=int, default=0, help="how many nodes")
    reserve.add_argument("--requires", help="only nodes with this label (alone: all of them)")
    reserve.add_argument("--name", help="the reservation's name (default: SIM@START)")
    reserve.set_defaults(arguments=_reserve_arguments, policy_command="reserve")

    unreserve = _remote(commands, "unreserve", "withdraw a reservation")
    unreserve.add_argument("name")
    unreserve.add_argument("--reason", default="")
    unreserve.set_defaults(arguments=_named, policy_command="unreserve")

    _remote(commands, "reservations", "list reservations and the nodes they hold").set_defaults(
        arguments=_nothing, policy_command="reservations"
    )

    window = _remote(commands, "maintenance", "schedule a maintenance window")
    window.add_argument("--name", required=True)
    window.add_argument("--start", required=True)
    window.add_argument("--end", required=True)
    window.add_argument("--severity", choices=("critical", "major", "minor"), default="major")
    window.add_argument("--nodes", help="comma-separated node names (default: every node)")
    window.add_argument("--requires", help="the nodes with this label")
    window.add_argument("--reason", default="")
    window.set_defaults(arguments=_window_arguments, policy_command="maintenance")

    cancel = _remote(commands, "cancel-maintenance", "call off a maintenance window")
    cancel.add_argument("name")
    cancel.add_argument("--reason", default="")
    cancel.set_defaults(arguments=_named, policy_command="cancel-maintenance")

    _remote(commands, "windows", "list maintenance windows").set_defaults(
        arguments=_nothing, policy_command="windows"
    )
    for verb, text in (("pin", "keep a sweep member running"), ("unpin", "undo a pin")):
        pin = _remote(commands, verb, text)
        pin.add_argument("job")
        pin.set_defaults(arguments=_job, policy_command=verb)
    _remote(commands, "scenarios", "rank sweep members and say why").set_defaults(
        arguments=_nothing, policy_command="scenarios"
    )
    _remote(commands, "nodes", "node reliability and reservations").set_defaults(
        arguments=_nothing, policy_command="nodes"
    )

    forecast = commands.add_parser("forecast", help="forecast daily core-hours per project")
    _journal_arguments(forecast)
    forecast.add_argument("--project", action="append", help="only these projects")
    forecast.add_argument("--horizon", type=int, help="days ahead (default: cluster.toml's)")
    forecast.add_argument("--csv", type=Path, help="write the forecast as CSV")
    forecast.add_argument("--chart", type=Path, help="draw it (.png or .svg)")
    forecast.set_defaults(handler=_forecast)

    report = commands.add_parser(
        "report", help="capacity and grant report: node-hours per project per month, 6 months on"
    )
    _journal_arguments(report)
    report.add_argument("--out", type=Path, required=True, help="folder for the CSV, JSON, charts")
    report.add_argument("--node-cores", type=float, default=1.0, help="cores of one node")
    report.add_argument("--months", type=int, default=6, help="months to forecast (default 6)")
    report.set_defaults(handler=_report)


def _remote(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=text)
    cli.add_client_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=_policy)
    return parser


def _journal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--journal", type=Path, default=Path("taskfarm.db"), help="the journal")
    parser.add_argument("--config", type=Path, help="cluster.toml (forecast settings)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _nothing(args: argparse.Namespace) -> PolicyArguments:
    return {}


def _named(args: argparse.Namespace) -> PolicyArguments:
    return {"name": args.name, "reason": args.reason}


def _job(args: argparse.Namespace) -> PolicyArguments:
    return {"job": args.job}


def _reserve_arguments(args: argparse.Namespace) -> PolicyArguments:
    if args.nodes < 0:
        raise ConfigurationError("must be at least 1", where="--nodes")
    if not args.nodes and not args.requires:
        raise ConfigurationError("give --nodes N or --requires LABEL", where="--nodes")
    found: PolicyArguments = {
        "for": args.job,
        "start": args.start,
        "duration": args.duration,
        "nodes": args.nodes,
    }
    if args.requires:
        found["requires"] = args.requires
    if args.name:
        found["name"] = args.name
    return found


def _window_arguments(args: argparse.Namespace) -> PolicyArguments:
    found: PolicyArguments = {
        "name": args.name,
        "start": args.start,
        "end": args.end,
        "severity": args.severity,
        "reason": args.reason,
    }
    if args.nodes:
        found["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if args.requires:
        found["requires"] = args.requires
    return found


async def _policy(args: argparse.Namespace) -> int:
    builder: Callable[[argparse.Namespace], PolicyArguments] = args.arguments
    arguments = builder(args)  # a bad argument is refused before anything connects
    reply = await cli.run_policy_command(args, args.policy_command, arguments)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True, default=str))
    else:
        print(_text(reply))
    return 0


def _text(reply: Any) -> str:
    """Render a policy reply readably: a table of rows, or key: value lines."""
    if isinstance(reply, list) and reply and all(isinstance(r, Mapping) for r in reply):
        if all("members" in r for r in reply):
            return "\n\n".join(_scenario_text(r) for r in reply)
        keys = list(reply[0])
        rows = [[_cell(r.get(k)) for k in keys] for r in reply]
        return _table(keys, rows)
    if isinstance(reply, Mapping):
        return "\n".join(f"{k}: {_cell(v)}" for k, v in reply.items())
    return "(none)" if reply in ([], None) else str(reply)


def _scenario_text(row: Mapping[str, Any]) -> str:
    head = f"scenario {row['scenario']}: {row['rungs_passed']} rung(s) decided"
    members = row["members"]
    table = _table(
        ["rank", "member", "score", "progress", "status", "why"],
        [
            [
                str(m["rank"]),
                _cell(m["member"]),
                _cell(m["score"]),
                f"{m['progress']:.0%}",
                _cell(m["status"]),
                _cell(m["why"]),
            ]
            for m in members
        ],
    )
    return f"{head}\n{table}"


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        if not value:
            return "-"
        return ",".join(str(v) for v in value) if len(value) <= 6 else f"{len(value)} items"
    if isinstance(value, float):
        return f"{value:.4g}"
    # A blank cell reads as a missing column to anyone who splits the table on whitespace (a
    # window without a reason put its nodes under REASON): nothing shows as "-".
    return "-" if value is None or value == "" else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# -- forecasting ------------------------------------------------------------------------------


def _exists(path: Path) -> bool:
    return path.exists()


async def _read(journal: Path) -> Usage:
    if not _exists(journal):
        raise ConfigurationError(f"{journal}: no such journal", where="--journal")
    # Lenient: events of other plugins (credentials, another domain) are kept undecoded.
    codec = EventCodec(keep_undecodable=True)
    codec.update(ENGINE_CODEC)
    codec.update(SCIENCE_CODEC)
    async with open_sqlite_journal(journal, clock=SystemClock(), codec=codec, read_only=True) as j:
        usage = await read_usage(j)
    store = usage_store_path(journal)
    if _exists(store):  # measured usage, beside the allocations (a coordinator with agents)
        await read_measured(store, usage)
    return usage


def usage_forecasts(
    usage: Usage, config: ClusterConfig, *, horizon: int, projects: list[str] | None = None
) -> list[SeriesForecast]:
    """Forecast the cluster and each project (or the ``projects`` named) ``horizon`` days on.

    Raises:
        ConfigurationError: the journal holds fewer days than ``min_history_days``, or a
            project named has no usage.
    """
    settings = config.forecast
    days = len(usage.days())
    if days < settings.min_history_days:
        raise ConfigurationError(
            f"the journal holds {days} day(s) of usage; a forecast needs at least "
            f"{settings.min_history_days} (forecast.min_history_days)",
            where="--journal",
        )
    names = [CLUSTER, *usage.projects()]
    if projects:
        unknown = sorted(set(projects) - set(usage.projects()))
        if unknown:
            raise ConfigurationError(
                f"no usage for project(s) {', '.join(unknown)} (known: "
                f"{', '.join(usage.projects()) or 'none'})",
                where="--project",
            )
        names = list(projects)
    return [
        forecast_series(
            name,
            usage.series(name),
            horizon=horizon,
            season=settings.season,
            origins=settings.backtest_origins,
            backtest_horizon=settings.backtest_horizon,
            level=settings.interval,
            informed={"queue_and_arrivals": _queue_and_arrivals(usage, name, settings)},
        )
        for name in names
    ]


def _queue_and_arrivals(usage: Usage, name: str, settings: ForecastSettings) -> Informed:
    """The queue and arrivals method for one series (see ``_backlog``)."""
    return functools.partial(
        usage.queue_and_arrivals,
        name,
        window=settings.arrival_window_days,
        stale=settings.queue_stale_days,
    )


def forecast_rows(usage: Usage, forecasts: list[SeriesForecast]) -> list[dict[str, Any]]:
    """Return one row per series per forecast day (for CSV and JSON)."""
    last = usage.days()[-1]
    rows = []
    for series in forecasts:
        for k, value in enumerate(series.forecast):
            rows.append(
                {
                    "series": series.name,
                    "day": (last + timedelta(days=k + 1)).isoformat(),
                    "core_hours": round(value, 3),
                    "low80": round(series.lower[k], 3),
                    "high80": round(series.upper[k], 3),
                    "method": series.method,
                }
            )
    return rows


def history_rows(usage: Usage, forecasts: list[SeriesForecast]) -> list[dict[str, Any]]:
    """Return one row per series per day of history: allocated core-hours (what is forecast)
    and measured CPU core-hours (None without a usage store)."""
    rows = []
    for series in forecasts:
        measured = usage.measured_series(series.name)
        for k, (day, value) in enumerate(zip(usage.days(), usage.series(series.name), strict=True)):
            rows.append(
                {
                    "series": series.name,
                    "day": day.isoformat(),
                    "allocated_core_hours": round(value, 3),
                    "measured_core_hours": None if measured is None else round(measured[k], 3),
                }
            )
    return rows


def _totals(usage: Usage, name: str) -> tuple[float, float | None]:
    measured = usage.measured_series(name)
    return sum(usage.series(name)), None if measured is None else sum(measured)


def _summary(series: SeriesForecast, usage: Usage) -> dict[str, Any]:
    def finite(value: float | None) -> float | None:
        return None if value is None or not math.isfinite(value) else round(value, 3)

    allocated, measured = _totals(usage, series.name)
    return {
        "series": series.name,
        "allocated_core_hours": round(allocated, 3),
        "measured_core_hours": None if measured is None else round(measured, 3),
        "method": series.method,
        "backtest": {
            m: {
                "wape": finite(a.wape),
                "weekly_wape": finite(a.weekly_wape),
                "mape": finite(a.mape),
                "mae": finite(a.mae),
                "coverage80": finite(a.coverage),
            }
            for m, a in series.accuracies.items()
        },
        "note": series.note,
    }


def _percent(value: float) -> str:
    """A score in %, or "undefined" (nothing was used in the days it scores)."""
    return f"{value:.1f} %" if math.isfinite(value) else "undefined"


async def _forecast(args: argparse.Namespace) -> int:
    config = load_cluster_config(args.config)
    usage = await _read(args.journal)
    horizon = args.horizon or config.forecast.horizon_days
    if horizon < 1:
        raise ConfigurationError("must be at least 1 day", where="--horizon")
    forecasts = usage_forecasts(usage, config, horizon=horizon, projects=args.project)
    rows = forecast_rows(usage, forecasts)
    if args.csv:
        _write_csv(args.csv, rows)
    if args.chart:
        from ._charts import forecast_chart

        assert usage.first is not None
        forecast_chart(
            args.chart, forecasts, first_day=usage.first, title="Daily core-hours and forecast"
        )
    if args.json:
        document = {
            "series": [_summary(f, usage) for f in forecasts],
            "forecast": rows,
            "history": history_rows(usage, forecasts),
        }
        print(json.dumps(document, indent=2))
        return 0
    for series in forecasts:
        chosen = series.accuracies[series.method]
        allocated, measured = _totals(usage, series.name)
        used = f"{allocated:,.0f} core-h allocated" + (
            " (no usage store)" if measured is None else f", {measured:,.0f} measured (CPU)"
        )
        print(
            f"{series.name}: {series.method.replace('_', ' ')} (backtest WAPE "
            f"{_percent(chosen.wape)}, weekly {_percent(chosen.weekly_wape)}, MAPE "
            f"{_percent(chosen.mape)}, MAE {chosen.mae:.1f} core-h, 80 % coverage "
            f"{(chosen.coverage or 0):.0%}); next {horizon} days: "
            f"{sum(series.forecast):,.0f} core-h; so far: {used}"
            + (f"  [{series.note}]" if series.note else "")
        )
    return 0


def report_table(
    usage: Usage, forecasts: list[SeriesForecast], *, node_cores: float, months: int
) -> list[dict[str, Any]]:
    """Return node-hours per project per month: used months (allocated, and measured CPU
    beside them when a usage store was read), then forecast ones (of allocations)."""
    rows: list[dict[str, Any]] = []
    last = usage.days()[-1]
    for series in forecasts:
        measured = usage.measured_monthly(series.name, per_node_cores=node_cores)
        for month, value in sorted(usage.monthly(series.name, per_node_cores=node_cores).items()):
            row: dict[str, Any] = {
                "project": series.name,
                "month": month,
                "node_hours": round(value, 1),
                "kind": "used",
            }
            if measured is not None:
                row["measured_node_hours"] = round(measured.get(month, 0.0), 1)
            rows.append(row)
        ahead: dict[str, list[float]] = {}
        for k, value in enumerate(series.forecast):
            day = last + timedelta(days=k + 1)
            key = f"{day.year:04d}-{day.month:02d}"
            bucket = ahead.setdefault(key, [0.0, 0.0, 0.0])
            bucket[0] += value / node_cores
            bucket[1] += series.lower[k] / node_cores
            bucket[2] += series.upper[k] / node_cores
        for month in sorted(ahead)[:months]:
            value, low, high = ahead[month]
            rows.append(
                {
                    "project": series.name,
                    "month": month,
                    "node_hours": round(value, 1),
                    "kind": "forecast",
                    "low80": round(low, 1),
                    "high80": round(high, 1),
                }
            )
    return rows


async def _report(args: argparse.Namespace) -> int:
    config = load_cluster_config(args.config)
    usage = await _read(args.journal)
    if args.node_cores <= 0:
        raise ConfigurationError("must be more than 0", where="--node-cores")
    if not 1 <= args.months <= 24:
        raise ConfigurationError("must be 1-24", where="--months")
    forecasts = usage_forecasts(usage, config, horizon=31 * args.months + 31)
    rows = report_table(usage, forecasts, node_cores=args.node_cores, months=args.months)
    out: Path = args.out
    write_report(out, usage, forecasts, rows, months=args.months)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"wrote {out / 'report.csv'}, report.json, report.png and report.svg")
    return 0


def write_report(
    out: Path,
    usage: Usage,
    forecasts: list[SeriesForecast],
    rows: list[dict[str, Any]],
    *,
    months: int,
) -> None:
    """Write ``report.csv``, ``report.json``, ``report.png`` and ``report.svg`` into ``out``."""
    from ._charts import forecast_chart

    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "report.csv", rows)
    summary = {"series": [_summary(f, usage) for f in forecasts], "months": rows}
    (out / "report.json").write_text(json.dumps(summary, indent=2, sort_keys=True), "utf-8")
    assert usage.first is not None
    for suffix in (".png", ".svg"):
        forecast_chart(
            out / f"report{suffix}",
            forecasts,
            first_day=usage.first,
            title=f"Core-hours per day and {months}-month forecast",
        )


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buffer.getvalue(), encoding="utf-8")
