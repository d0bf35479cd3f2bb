"""``cluster.toml``: owners and projects, protection, fair share, checkpoints, recovery,
maintenance windows, reservations, forecasts and scenarios, validated into one frozen value.

Every section and field has a default a real cluster can start with, so an empty file (or no
file) is a valid configuration.  Unknown fields are refused; every error names the file, the
field path (``protection.budgets.high``) and what was expected.  Durations are numbers of
seconds or strings such as ``"90m"``, ``"6h"``, ``"7d"``; sizes are bytes or ``"50GiB"``;
times are TOML offset date-times (``2027-03-01T08:00:00Z``).
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from actors import Priority, ResourceError, parse_duration, parse_size
from runtime import ConfigurationError

__all__ = [
    "RESILIENCE_LEVELS",
    "CheckpointSettings",
    "ClusterConfig",
    "FairShareSettings",
    "ForecastSettings",
    "MaintenanceWindow",
    "ProtectionSettings",
    "RecoverySettings",
    "Reservation",
    "ScenarioSettings",
    "Severity",
    "load_cluster_config",
    "parse_cluster_config",
]

Severity = Literal["critical", "major", "minor"]
Resilience = Literal["low", "medium", "high", "critical"]
RESILIENCE_LEVELS: Final = ("low", "medium", "high", "critical")
Strategy = Literal["restart_elsewhere", "restart", "more_memory", "hold"]
FailureKind = Literal["lost", "crash", "oom", "timeout", "stall", "disk_full"]


class Weighted(msgspec.Struct, frozen=True, kw_only=True):
    """An owner or a project: its fair-share weight (its target share is its weight over the
    sum of the weights of those with work)."""

    weight: float = 1.0


class ProtectionSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Long-running protection: preemptions per priority per simulation per 24 h, the
    runtime before a stage may be preempted, the rest after a preemption."""

    budgets: Mapping[str, int] = msgspec.field(
        default_factory=lambda: {"critical": 0, "high": 1, "medium": 2, "low": 4, "background": 8}
    )
    minimum_runtime: float = 3600.0
    protection_window: float = 6 * 3600.0
    # A waiting stage preempts only work of a priority at least this many ranks lower.
    priority_gap: int = 1
    # Checkpointable, preemptible stages may run on a reservation's nodes past its start: they
    # checkpoint and yield this long before it (so they cannot delay it).
    preemptible_backfill: bool = True
    yield_lead: float = 900.0

    def budget(self, priority: Priority) -> int:
        """Return the daily budget of preemptions for a simulation of ``priority``."""
        return self.budgets.get(priority.value, 0)


class FairShareSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Fair share and aging, in priority points (a priority rank is worth ``per_priority``)."""

    half_life: float = 7 * 86400.0
    per_priority: float = 1.0  # points per priority rank (background 0 .. critical 4)
    fair_share: float = 1.0  # points for an owner and project with no usage (0 at 2x share)
    aging_per_day: float = 1.0  # points a waiting simulation gains per day of waiting
    survivor: float = 0.5  # points per successive-halving rung a sweep member survived


class CheckpointSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The checkpoint policy: interval by resilience level, adapted to measured cost and
    failure rate (Young/Daly) within a maximum overhead share."""

    intervals: Mapping[str, float] = msgspec.field(
        default_factory=lambda: {
            "low": 7200.0,
            "medium": 3600.0,
            "high": 1800.0,
            "critical": 900.0,
        }
    )
    bandwidth: float = 1024.0**3  # bytes per second to the checkpoint storage
    max_overhead: float = 0.02
    expected_mtbf: float = 30 * 86400.0  # per node, until failures are measured
    adapt: bool = True


class RecoverySettings(msgspec.Struct, frozen=True, kw_only=True):
    """Failure recovery: strategies in order per failure class, and their backoff."""

    backoff: tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 3600.0)
    strategies: Mapping[str, tuple[str, ...]] = msgspec.field(
        default_factory=lambda: {
            "lost": ("restart_elsewhere", "restart_elsewhere", "restart_elsewhere", "hold"),
            "crash": ("restart_elsewhere", "restart", "hold"),
            "oom": ("more_memory", "more_memory", "restart_elsewhere", "hold"),
            "timeout": ("restart", "hold"),
            "stall": ("restart_elsewhere", "hold"),
            "disk_full": ("restart_elsewhere", "hold"),
        }
    )
    memory_factor: float = 1.5
    reliability_half_life: float = 7 * 86400.0
    avoid_below: float = 0.6  # a node whose reliability falls below this gets no stage


class ForecastSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Resource forecasting: horizon, season, rolling-origin backtesting, and the queue and
    arrivals method's settings (the trailing days its arrivals are learned from; the days a
    ready stage may wait before it counts as held rather than queued)."""

    horizon_days: int = 182
    season: int = 7
    backtest_origins: int = 6
    backtest_horizon: int = 14
    min_history_days: int = 21
    interval: float = 0.8
    arrival_window_days: int = 28
    queue_stale_days: float = 7.0


class ScenarioSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Scenario scoring (weights of the criteria a simulation reports as metrics) and
    successive halving (rungs by progress fraction, keep the top 1/eta)."""

    weights: Mapping[str, float] = msgspec.field(
        default_factory=lambda: {
            "accuracy": 1.0,
            "convergence": 1.0,
            "stability": 1.0,
            "novelty": 0.5,
            "significance": 1.0,
        }
    )
    eta: int = 3
    rungs: tuple[float, ...] = (1 / 9, 1 / 3)


class MaintenanceWindow(msgspec.Struct, frozen=True, kw_only=True):
    """Nodes out of service from ``start`` to ``end``: all nodes, the ``nodes`` named, or
    those with the label ``requires``.  ``critical`` and ``major`` windows drain the nodes
    (critical ones even nodes a reservation holds); ``minor`` ones only move background work
    off them."""

    name: str
    start: datetime
    end: datetime
    severity: Severity = "major"
    nodes: tuple[str, ...] = ()
    requires: str | None = None
    reason: str = ""
    #: Who scheduled it: a client credential's name, ``cluster.toml``, or "" (the embedding
    #: application, a join-token client, or a window journaled before this was recorded).
    by: str = ""

    def covers(self, node: str, labels: Mapping[str, str]) -> bool:
        """Return whether the window takes ``node`` (with ``labels``) out of service."""
        if self.nodes:
            return node in self.nodes
        if self.requires is not None:
            key, eq, value = self.requires.partition("=")
            return labels.get(key) == value if eq else key in labels
        return True

    def overlaps(self, start: datetime, end: datetime) -> bool:
        """Return whether [start, end) meets the window."""
        return start < self.end and self.start < end


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """``count`` nodes (with the label ``requires``, or any) held for simulation ``job_id``
    from ``start`` for ``duration`` seconds; ``count`` 0 means every node with the label."""

    name: str
    job_id: str
    start: datetime
    duration: float
    count: int = 0
    requires: str | None = None
    made_at: datetime | None = None
    #: Who made it: a client credential's name, ``cluster.toml``, or "" (the embedding
    #: application, a join-token client, or a reservation journaled before this was recorded).
    by: str = ""

    @property
    def end(self) -> datetime:
        """Return when the reservation ends."""
        return self.start + timedelta(seconds=self.duration)


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The whole ``cluster.toml``."""

    owners: Mapping[str, Weighted] = msgspec.field(default_factory=dict)
    projects: Mapping[str, Weighted] = msgspec.field(default_factory=dict)
    protection: ProtectionSettings = ProtectionSettings()
    fair_share: FairShareSettings = FairShareSettings()
    checkpoints: CheckpointSettings = CheckpointSettings()
    recovery: RecoverySettings = RecoverySettings()
    forecast: ForecastSettings = ForecastSettings()
    scenarios: ScenarioSettings = ScenarioSettings()
    maintenance: tuple[MaintenanceWindow, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    cycle_interval: float = 900.0
    source: str = "<defaults>"

    def weight(self, kind: Literal["owner", "project"], name: str) -> float:
        """Return the fair-share weight of an owner or project (1 when not listed)."""
        table = self.owners if kind == "owner" else self.projects
        entry = table.get(name)
        return entry.weight if entry is not None else 1.0


# -- the inbound format (unknown fields refused) ------------------------------------------------

_Duration = int | float | Annotated[str, msgspec.Meta(max_length=40)]
_Name = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")]
_Weight = Annotated[float, msgspec.Meta(gt=0, le=1e6)]


class _WeightedIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    weight: _Weight = 1.0


class _ProtectionIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    budgets: dict[str, Annotated[int, msgspec.Meta(ge=0, le=1000)]] = {}
    minimum_runtime: _Duration = "1h"
    protection_window: _Duration = "6h"
    priority_gap: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1
    preemptible_backfill: bool = True
    yield_lead: _Duration = "15m"


class _FairShareIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    half_life: _Duration = "7d"
    per_priority: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 1.0
    fair_share: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 1.0
    aging_per_day: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    survivor: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.5


class _CheckpointsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    intervals: dict[str, _Duration] = {}
    bandwidth: int | Annotated[str, msgspec.Meta(max_length=40)] = "1GiB"
    max_overhead: Annotated[float, msgspec.Meta(gt=0, le=0.5)] = 0.02
    expected_mtbf: _Duration = "30d"
    adapt: bool = True


class _RecoveryIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    backoff: Annotated[list[_Duration], msgspec.Meta(min_length=1, max_length=20)] = msgspec.field(
        default_factory=lambda: ["5m", "10m", "20m", "40m", "60m"]
    )
    strategies: dict[FailureKind, Annotated[list[Strategy], msgspec.Meta(max_length=20)]] = {}
    memory_factor: Annotated[float, msgspec.Meta(gt=1, le=16)] = 1.5
    reliability_half_life: _Duration = "7d"
    avoid_below: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.6


class _ForecastIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    horizon_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 182
    season: Annotated[int, msgspec.Meta(ge=2, le=366)] = 7
    backtest_origins: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    backtest_horizon: Annotated[int, msgspec.Meta(ge=1, le=366)] = 14
    min_history_days: Annotated[int, msgspec.Meta(ge=7, le=3660)] = 21
    interval: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.8
    arrival_window_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 28
    queue_stale_days: Annotated[float, msgspec.Meta(gt=0, le=3660)] = 7.0


class _ScenariosIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    weights: dict[str, Annotated[float, msgspec.Meta(ge=0, le=1000)]] = {}
    eta: Annotated[int, msgspec.Meta(ge=2, le=10)] = 3
    rungs: Annotated[
        list[Annotated[float, msgspec.Meta(gt=0, lt=1)]], msgspec.Meta(max_length=10)
    ] = msgspec.field(default_factory=lambda: [1 / 9, 1 / 3])


class _MaintenanceIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: _Name
    start: datetime
    end: datetime
    severity: Severity = "major"
    nodes: Annotated[list[_Name], msgspec.Meta(max_length=100_000)] = []
    requires: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class _ReservationIn(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, rename={"job_id": "for"}
):
    name: _Name
    job_id: _Name
    start: datetime
    duration: _Duration
    nodes: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    requires: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class _ClusterIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    owners: dict[_Name, _WeightedIn] = {}
    projects: dict[_Name, _WeightedIn] = {}
    protection: _ProtectionIn = msgspec.field(default_factory=_ProtectionIn)
    fair_share: _FairShareIn = msgspec.field(default_factory=_FairShareIn)
    checkpoints: _CheckpointsIn = msgspec.field(default_factory=_CheckpointsIn)
    recovery: _RecoveryIn = msgspec.field(default_factory=_RecoveryIn)
    forecast: _ForecastIn = msgspec.field(default_factory=_ForecastIn)
    scenarios: _ScenariosIn = msgspec.field(default_factory=_ScenariosIn)
    maintenance: Annotated[list[_MaintenanceIn], msgspec.Meta(max_length=10_000)] = []
    reservations: Annotated[list[_ReservationIn], msgspec.Meta(max_length=10_000)] = []
    cycle_interval: _Duration = "15m"


_PRIORITIES: Final = tuple(p.value for p in Priority)


def load_cluster_config(path: str | Path | None) -> ClusterConfig:
    """Load ``cluster.toml`` (None: the defaults).

    Raises:
        ConfigurationError: the file cannot be read, is not TOML, or a field is wrong (the
            error names the file and the field).
    """
    if path is None:
        return ClusterConfig()
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read it: {error}", where=source) from None
    return parse_cluster_config(text, source=source)


def parse_cluster_config(text: str, *, source: str = "cluster.toml") -> ClusterConfig:
    """Parse the text of a ``cluster.toml``.

    Raises:
        ConfigurationError: it is not TOML or a field is wrong (naming ``source`` and the field).
    """
    try:
        data: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"invalid TOML: {error}", where=source) from None
    try:
        raw = msgspec.convert(data, type=_ClusterIn)
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `$")
        field = _name_keys(data, path.rstrip("`").lstrip(".")) or "(top level)"
        raise ConfigurationError(message, where=f"{source}: {field}") from None
    return _Build(source).build(raw)


def _name_keys(data: Any, path: str) -> str:
    """Replace msgspec's ``[...]`` (some key of a table) by the key at fault, found by
    converting the document with only one key of that table at a time."""
    if "[...]" not in path:
        return path
    prefix, _, rest = path.partition("[...]")
    parts = [p for p in prefix.split(".") if p]
    table: Any = data
    for part in parts:
        if not isinstance(table, dict) or part not in table:
            return path
        table = table[part]
    if not isinstance(table, dict):
        return path
    for key in table:
        trial: Any = copy.deepcopy(data)
        holder = trial
        for part in parts[:-1]:
            holder = holder[part]
        holder[parts[-1]] = {key: table[key]}
        try:
            msgspec.convert(trial, type=_ClusterIn)
        except msgspec.ValidationError:
            return f"{prefix}.{key}{rest}"
    return path


class _Build:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> ConfigurationError:
        return ConfigurationError(problem, where=f"{self.source}: {field}")

    def duration(self, field: str, value: int | float | str, *, positive: bool = True) -> float:
        try:
            seconds = parse_duration(value, what=field)
        except ValueError as error:
            raise self.fail(field, str(error).partition(": ")[2] or str(error)) from None
        if positive and not seconds > 0:
            raise self.fail(field, "must be more than 0")
        return seconds

    def build(self, raw: _ClusterIn) -> ClusterConfig:
        p = raw.protection
        for name in p.budgets:
            if name not in _PRIORITIES:
                raise self.fail(
                    f"protection.budgets.{name}",
                    f"unknown priority; expected one of {', '.join(_PRIORITIES)}",
                )
        budgets = {**ProtectionSettings().budgets, **p.budgets}
        protection = ProtectionSettings(
            budgets=budgets,
            minimum_runtime=self.duration(
                "protection.minimum_runtime", p.minimum_runtime, positive=False
            ),
            protection_window=self.duration(
                "protection.protection_window", p.protection_window, positive=False
            ),
            priority_gap=p.priority_gap,
            preemptible_backfill=p.preemptible_backfill,
            yield_lead=self.duration("protection.yield_lead", p.yield_lead),
        )
        f = raw.fair_share
        fair_share = FairShareSettings(
            half_life=self.duration("fair_share.half_life", f.half_life),
            per_priority=f.per_priority,
            fair_share=f.fair_share,
            aging_per_day=f.aging_per_day,
            survivor=f.survivor,
        )
        c = raw.checkpoints
        for name in c.intervals:
            if name not in RESILIENCE_LEVELS:
                raise self.fail(
                    f"checkpoints.intervals.{name}",
                    f"unknown resilience level; expected one of {', '.join(RESILIENCE_LEVELS)}",
                )
        intervals = {
            **CheckpointSettings().intervals,
            **{k: self.duration(f"checkpoints.intervals.{k}", v) for k, v in c.intervals.items()},
        }
        try:
            bandwidth = float(parse_size(c.bandwidth))
        except (ValueError, ResourceError) as error:
            raise self.fail("checkpoints.bandwidth", str(error)) from None
        if not bandwidth > 0:
            raise self.fail("checkpoints.bandwidth", "must be more than 0 bytes per second")
        checkpoints = CheckpointSettings(
            intervals=intervals,
            bandwidth=bandwidth,
            max_overhead=c.max_overhead,
            expected_mtbf=self.duration("checkpoints.expected_mtbf", c.expected_mtbf),
            adapt=c.adapt,
        )
        r = raw.recovery
        strategies: dict[str, tuple[str, ...]] = dict(RecoverySettings().strategies)
        strategies.update({k: tuple(v) for k, v in r.strategies.items()})
        for kind, steps in strategies.items():
            if not steps:
                raise self.fail(f"recovery.strategies.{kind}", "needs at least one strategy")
        recovery = RecoverySettings(
            backoff=tuple(
                self.duration(f"recovery.backoff[{i}]", v, positive=False)
                for i, v in enumerate(r.backoff)
            ),
            strategies=strategies,
            memory_factor=r.memory_factor,
            reliability_half_life=self.duration(
                "recovery.reliability_half_life", r.reliability_half_life
            ),
            avoid_below=r.avoid_below,
        )
        fc = raw.forecast
        forecast = ForecastSettings(
            horizon_days=fc.horizon_days,
            season=fc.season,
            backtest_origins=fc.backtest_origins,
            backtest_horizon=fc.backtest_horizon,
            min_history_days=fc.min_history_days,
            interval=fc.interval,
            arrival_window_days=fc.arrival_window_days,
            queue_stale_days=fc.queue_stale_days,
        )
        s = raw.scenarios
        rungs = tuple(s.rungs)
        if list(rungs) != sorted(set(rungs)):
            raise self.fail("scenarios.rungs", "must be increasing progress fractions (0 < r < 1)")
        weights = {**ScenarioSettings().weights, **s.weights}
        if not any(w > 0 for w in weights.values()):
            raise self.fail("scenarios.weights", "at least one criterion needs a weight above 0")
        scenarios = ScenarioSettings(weights=weights, eta=s.eta, rungs=rungs)
        windows: list[MaintenanceWindow] = []
        seen: set[str] = set()
        for i, m in enumerate(raw.maintenance):
            at = f"maintenance[{i}]"
            if m.name in seen:
                raise self.fail(f"{at}.name", f"duplicate window name {m.name!r}")
            seen.add(m.name)
            for field, value in (("start", m.start), ("end", m.end)):
                if value.tzinfo is None:
                    raise self.fail(
                        f"{at}.{field}", "needs a UTC offset (e.g. 2027-03-01T08:00:00Z)"
                    )
            if not m.end > m.start:
                raise self.fail(f"{at}.end", "must be after start")
            if m.nodes and m.requires:
                raise self.fail(f"{at}.requires", "give nodes or requires, not both")
            windows.append(
                MaintenanceWindow(
                    name=m.name,
                    start=m.start,
                    end=m.end,
                    severity=m.severity,
                    nodes=tuple(sorted(set(m.nodes))),
                    requires=m.requires,
                    reason=m.reason,
                    by="cluster.toml",
                )
            )
        reservations: list[Reservation] = []
        names: set[str] = set()
        for i, res in enumerate(raw.reservations):
            at = f"reservations[{i}]"
            if res.name in names:
                raise self.fail(f"{at}.name", f"duplicate reservation name {res.name!r}")
            names.add(res.name)
            if res.start.tzinfo is None:
                raise self.fail(f"{at}.start", "needs a UTC offset (e.g. 2027-03-01T08:00:00Z)")
            if not res.nodes and not res.requires:
                raise self.fail(
                    f"{at}.nodes", "give a node count, or requires (every node with the label)"
                )
            reservations.append(
                Reservation(
                    name=res.name,
                    job_id=res.job_id,
                    start=res.start,
                    duration=self.duration(f"{at}.duration", res.duration),
                    count=res.nodes,
                    requires=res.requires,
                    by="cluster.toml",
                )
            )
        cycle = self.duration("cycle_interval", raw.cycle_interval)
        if not math.isfinite(cycle) or cycle > 86400:
            raise self.fail("cycle_interval", "must be at most one day")
        return ClusterConfig(
            owners={k: Weighted(weight=v.weight) for k, v in raw.owners.items()},
            projects={k: Weighted(weight=v.weight) for k, v in raw.projects.items()},
            protection=protection,
            fair_share=fair_share,
            checkpoints=checkpoints,
            recovery=recovery,
            forecast=forecast,
            scenarios=scenarios,
            maintenance=tuple(windows),
            reservations=tuple(reservations),
            cycle_interval=cycle,
            source=self.source,
        )
