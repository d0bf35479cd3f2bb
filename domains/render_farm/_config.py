"""The farm's configuration, ``farm.toml``: clients and their shares, node classes and their
power, tariffs, the energy mode, preview defaults and the deadline margin.

The file is parsed into :class:`FarmConfig`, a frozen msgspec struct, so the very object the
policy decides with is what the journal records when the configuration changes (a reload is an
event in the policy's stream, replayed on restart).  Every error names the file and the field
(``farm.toml: clients[1].maximum: 40 is below the guarantee of 50``).  Durations are seconds or
strings such as ``"2h"``; shares are percentages of the farm.

    margin = "2h"                       # deadline safety margin
    reclaim_after = "2m"                # a lender's work waits this long before loans are reclaimed
    max_errors = 3                      # failed attempts of a job before it fails
    frame_estimate = "10m"              # per-frame prior when a job gives none
    timezone = "Europe/London"          # of the tariff hours

    [[clients]]
    id = "acme"
    name = "Acme Pictures"
    tier = "premium"                    # basic, standard or premium
    guaranteed = 50                     # % of the online farm
    maximum = 80                        # % it may never exceed
    borrowing_limit = 30                # % it may borrow beyond its guarantee

    [[node_classes]]
    name = "gpu"                        # agents say ``--label class=gpu``
    watts = { idle = 150, busy = 650, sleep = 8 }
    performance = 1.3                   # relative speed (a prior; measured speed replaces it)
    job_types = ["vfx", "lighting"]     # what it is built for
    scarce = true                       # small jobs should leave it alone

    [energy]
    mode = "balanced"                   # performance, balanced, efficiency, night-savings
    auto = false                        # switch peak_mode / off_peak_mode at tariff boundaries
    reserve = 2                         # idle nodes kept awake
    sleep_after = "15m"

    [[tariffs]]
    days = ["mon", "tue", "wed", "thu", "fri"]
    peak_hours = ["07:00-23:00"]
    peak_price = 0.32                   # per kWh
    off_peak_price = 0.11

    [previews]
    stride = 8
    passes = [0.25, 0.5]
    max_passes = 2
    overhead = 0.05
    first_within = 0.10
"""

from __future__ import annotations

import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from actors import parse_duration
from runtime import ConfigurationError

__all__ = [
    "ENERGY_MODES",
    "TIERS",
    "Client",
    "EnergyMode",
    "EnergySettings",
    "FarmConfig",
    "NodeClass",
    "PreviewDefaults",
    "Tariff",
    "Tier",
    "load_farm_config",
    "parse_farm_config",
]

Tier = Literal["basic", "standard", "premium"]
EnergyMode = Literal["performance", "balanced", "efficiency", "night-savings"]
TIERS: Final[tuple[Tier, ...]] = ("basic", "standard", "premium")
ENERGY_MODES: Final[tuple[EnergyMode, ...]] = (
    "performance",
    "balanced",
    "efficiency",
    "night-savings",
)
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MAX_CONFIG_BYTES: Final = 1 << 20
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# -- the configuration (what the policy uses and the journal records) ---------------------------


class Client(msgspec.Struct, frozen=True, kw_only=True):
    """A client studio: its tier and its shares, in percent of the online farm."""

    id: str
    name: str = ""
    tier: Tier = "standard"
    guaranteed: float = 0.0
    maximum: float = 100.0
    borrowing_limit: float = 100.0

    @property
    def label(self) -> str:
        """Return the name to show (the id when it has none)."""
        return self.name or self.id


class NodeClass(msgspec.Struct, frozen=True, kw_only=True):
    """A class of nodes: its power draw (watts) and what it is good at."""

    name: str
    idle_watts: float = 100.0
    busy_watts: float = 300.0
    sleep_watts: float = 5.0
    performance: float = 1.0
    job_types: tuple[str, ...] = ()
    scarce: bool = False


class Tariff(msgspec.Struct, frozen=True, kw_only=True):
    """Electricity prices on some weekdays (0 Monday): peak hours as minute ranges of the
    day, and the prices per kWh inside and outside them."""

    days: tuple[int, ...]
    peak: tuple[tuple[int, int], ...]
    peak_price: float
    off_peak_price: float


class EnergySettings(msgspec.Struct, frozen=True, kw_only=True):
    """The energy mode and how idle nodes are put to sleep."""

    mode: EnergyMode = "balanced"
    auto: bool = False
    peak_mode: EnergyMode = "night-savings"
    off_peak_mode: EnergyMode = "balanced"
    reserve: int = 2
    sleep_after: float = 900.0


class PreviewDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """Previews first: every ``stride``-th frame first, then low-quality ``passes`` (at most
    ``max_passes``, their compute at most ``overhead`` of the job's), the first of them done
    within ``first_within`` of the job's estimated duration.  A pass at quality q costs
    q ** ``cost_exponent`` of a full frame (the pixel count of a q-scaled image)."""

    stride: int = 8
    passes: tuple[float, ...] = (0.25, 0.5)
    max_passes: int = 2
    overhead: float = 0.05
    first_within: float = 0.10
    cost_exponent: float = 2.0


class FarmConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The whole configuration; ``source`` names the file it came from."""

    clients: tuple[Client, ...]
    node_classes: tuple[NodeClass, ...] = ()
    default_class: NodeClass = NodeClass(name="default")
    tariffs: tuple[Tariff, ...] = ()
    flat_price: float = 0.20
    timezone: str = "UTC"
    energy: EnergySettings = EnergySettings()
    previews: PreviewDefaults = PreviewDefaults()
    margin: float = 7200.0
    reclaim_after: float = 120.0
    max_errors: int = 3
    frame_estimate: float = 600.0
    source: str = ""

    def client(self, client_id: str) -> Client | None:
        """Return the client with this id, or None."""
        for client in self.clients:
            if client.id == client_id:
                return client
        return None

    def node_class(self, name: str | None) -> NodeClass:
        """Return the named class (the default class for an unknown or missing name)."""
        if name:
            for node_class in self.node_classes:
                if node_class.name == name:
                    return node_class
        return self.default_class

    def guarantees(self) -> dict[str, float]:
        """Return each client's guaranteed fraction of the farm (0-1), scaled down in
        proportion when the guarantees add up to more than 100 %."""
        total = sum(c.guaranteed for c in self.clients)
        scale = 100.0 / total if total > 100.0 else 1.0
        return {c.id: c.guaranteed * scale / 100.0 for c in self.clients}

    def price(self, at: datetime) -> float:
        """Return the price per kWh at ``at`` (the flat price when no tariff covers the day)."""
        local = at.astimezone(self.zone())
        minute = local.hour * 60 + local.minute
        for tariff in self.tariffs:
            if local.weekday() in tariff.days:
                peak = any(start <= minute < end for start, end in tariff.peak)
                return tariff.peak_price if peak else tariff.off_peak_price
        return self.flat_price

    def is_peak(self, at: datetime) -> bool:
        """Return whether ``at`` is in a tariff's peak hours."""
        local = at.astimezone(self.zone())
        minute = local.hour * 60 + local.minute
        return any(
            local.weekday() in t.days and any(s <= minute < e for s, e in t.peak)
            for t in self.tariffs
        )

    def next_price_change(self, after: datetime) -> datetime | None:
        """Return the first tariff boundary after ``after`` (None without tariffs)."""
        if not self.tariffs:
            return None
        zone = self.zone()
        local = after.astimezone(zone)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0)
        current = self.price(after)
        peak = self.is_peak(after)
        for offset in range(8):
            midnight = day + timedelta(days=offset)
            marks = {0, *(m for t in self.tariffs for r in t.peak for m in r if m < 1440)}
            for minute in sorted(marks):
                # Wall-clock arithmetic in the zone, so a DST day keeps its hours.
                candidate = (midnight + timedelta(minutes=minute)).replace(tzinfo=None)
                moment = candidate.replace(tzinfo=zone).astimezone(after.tzinfo)
                if moment <= after:
                    continue
                if self.price(moment) != current or self.is_peak(moment) != peak:
                    return moment
        return None

    def next_off_peak(self, after: datetime) -> datetime:
        """Return ``after`` if it is off-peak, else when the current peak ends."""
        moment = after
        for _ in range(16):
            if not self.is_peak(moment):
                return moment
            following = self.next_price_change(moment)
            if following is None:
                return moment
            moment = following
        return moment

    def zone(self) -> zoneinfo.ZoneInfo:
        """Return the tariffs' time zone."""
        return _zone(self.timezone)


_ZONES: dict[str, zoneinfo.ZoneInfo] = {}


def _zone(name: str) -> zoneinfo.ZoneInfo:
    zone = _ZONES.get(name)
    if zone is None:
        zone = _ZONES[name] = zoneinfo.ZoneInfo(name)
    return zone


# -- the file format (unknown fields refused) ---------------------------------------------------

_Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
_Duration = Annotated[float, msgspec.Meta(ge=0)] | str
_Name = Annotated[str, msgspec.Meta(pattern=_ID)]
_Watts = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]


class _ClientIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: _Name
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    tier: Tier = "standard"
    guaranteed: _Percent = 0.0
    maximum: _Percent = 100.0
    borrowing_limit: _Percent = 100.0


class _WattsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    idle: _Watts
    busy: _Watts
    sleep: _Watts = 5.0


class _NodeClassIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: _Name
    watts: _WattsIn
    performance: Annotated[float, msgspec.Meta(gt=0, le=100)] = 1.0
    job_types: Annotated[list[_Name], msgspec.Meta(max_length=64)] = []
    scarce: bool = False


class _EnergyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: EnergyMode = "balanced"
    auto: bool = False
    peak_mode: EnergyMode = "night-savings"
    off_peak_mode: EnergyMode = "balanced"
    reserve: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 2
    sleep_after: _Duration = 900.0
    default_watts: _WattsIn | None = None


class _TariffIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    days: Annotated[list[str], msgspec.Meta(min_length=1, max_length=7)]
    peak_hours: Annotated[list[str], msgspec.Meta(max_length=24)] = []
    peak_price: Annotated[float, msgspec.Meta(ge=0)]
    off_peak_price: Annotated[float, msgspec.Meta(ge=0)]


class _PreviewsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stride: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 8
    passes: Annotated[
        list[Annotated[float, msgspec.Meta(gt=0, lt=1)]], msgspec.Meta(max_length=8)
    ] = msgspec.field(default_factory=lambda: [0.25, 0.5])
    max_passes: Annotated[int, msgspec.Meta(ge=0, le=8)] = 2
    overhead: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05
    first_within: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.10
    cost_exponent: Annotated[float, msgspec.Meta(ge=0, le=4)] = 2.0


class _FarmIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    clients: Annotated[list[_ClientIn], msgspec.Meta(min_length=1, max_length=1000)]
    node_classes: Annotated[list[_NodeClassIn], msgspec.Meta(max_length=256)] = []
    tariffs: Annotated[list[_TariffIn], msgspec.Meta(max_length=7)] = []
    flat_price: Annotated[float, msgspec.Meta(ge=0)] = 0.20
    timezone: str = "UTC"
    energy: _EnergyIn = msgspec.field(default_factory=_EnergyIn)
    previews: _PreviewsIn = msgspec.field(default_factory=_PreviewsIn)
    margin: _Duration = 7200.0
    reclaim_after: _Duration = 120.0
    max_errors: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    frame_estimate: _Duration = 600.0


def load_farm_config(path: str | Path) -> FarmConfig:
    """Read and validate ``farm.toml``.

    Raises:
        ConfigurationError: the file cannot be read or is invalid; the error names the file
            and the field.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigurationError(
            f"cannot read the file: {error.strerror or error}", where=str(path)
        ) from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigurationError("larger than 1 MiB: not a farm configuration", where=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError("not UTF-8 text", where=str(path)) from None
    return parse_farm_config(text, source=str(path))


def parse_farm_config(text: str, *, source: str = "farm.toml") -> FarmConfig:
    """Parse and validate the text of a ``farm.toml``; ``source`` names it in errors.

    Raises:
        ConfigurationError: naming ``source`` and the field at fault.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"invalid TOML: {error}", where=source) from None
    try:
        raw = msgspec.convert(data, type=_FarmIn)
    except msgspec.ValidationError as error:
        field, problem = _field_of(str(error))
        raise ConfigurationError(problem, where=f"{source}: {field}" if field else source) from None
    return _Builder(source).build(raw)


def _field_of(message: str) -> tuple[str, str]:
    """Split msgspec's ``problem - at `$.a[0].b``` into ``("a[0].b", problem)``."""
    problem, _, path = message.partition(" - at `$")
    path = path.rstrip("`").lstrip(".")
    if found := re.fullmatch(r"Object missing required field `(.+)`", problem):
        return (f"{path}.{found.group(1)}" if path else found.group(1)), "required field is missing"
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", problem):
        return (f"{path}.{found.group(1)}" if path else found.group(1)), "unknown field"
    return path, problem.replace("`", "")


class _Builder:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, problem: str) -> ConfigurationError:
        return ConfigurationError(problem, where=f"{self.source}: {field}")

    def duration(self, field: str, value: float | str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise self.fail(field, str(error).partition(": ")[2] or str(error)) from None
        if seconds > 365 * 86400:
            raise self.fail(field, f"{value!r} is longer than a year")
        return seconds

    def build(self, raw: _FarmIn) -> FarmConfig:
        clients: list[Client] = []
        seen: dict[str, int] = {}
        for i, client in enumerate(raw.clients):
            if client.id in seen:
                raise self.fail(
                    f"clients[{i}].id",
                    f"duplicate client id {client.id!r} (also clients[{seen[client.id]}])",
                )
            seen[client.id] = i
            if client.maximum < client.guaranteed:
                raise self.fail(
                    f"clients[{i}].maximum",
                    f"{client.maximum:g} % is below the guarantee of {client.guaranteed:g} %",
                )
            clients.append(
                Client(
                    id=client.id,
                    name=client.name,
                    tier=client.tier,
                    guaranteed=client.guaranteed,
                    maximum=client.maximum,
                    borrowing_limit=client.borrowing_limit,
                )
            )
        classes: list[NodeClass] = []
        names: dict[str, int] = {}
        for i, node_class in enumerate(raw.node_classes):
            if node_class.name in names:
                raise self.fail(
                    f"node_classes[{i}].name",
                    f"duplicate class {node_class.name!r} "
                    f"(also node_classes[{names[node_class.name]}])",
                )
            names[node_class.name] = i
            watts = node_class.watts
            if watts.busy < watts.idle:
                raise self.fail(
                    f"node_classes[{i}].watts.busy",
                    f"{watts.busy:g} W is below the idle draw of {watts.idle:g} W",
                )
            classes.append(
                NodeClass(
                    name=node_class.name,
                    idle_watts=watts.idle,
                    busy_watts=watts.busy,
                    sleep_watts=watts.sleep,
                    performance=node_class.performance,
                    job_types=tuple(node_class.job_types),
                    scarce=node_class.scarce,
                )
            )
        default = NodeClass(name="default")
        if raw.energy.default_watts is not None:
            w = raw.energy.default_watts
            default = NodeClass(
                name="default", idle_watts=w.idle, busy_watts=w.busy, sleep_watts=w.sleep
            )
        try:
            _zone(raw.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise self.fail("timezone", f"unknown time zone {raw.timezone!r}") from None
        tariffs = self.tariffs(raw.tariffs)
        previews = raw.previews
        passes = tuple(sorted(set(previews.passes)))
        energy = raw.energy
        return FarmConfig(
            clients=tuple(clients),
            node_classes=tuple(classes),
            default_class=default,
            tariffs=tariffs,
            flat_price=raw.flat_price,
            timezone=raw.timezone,
            energy=EnergySettings(
                mode=energy.mode,
                auto=energy.auto,
                peak_mode=energy.peak_mode,
                off_peak_mode=energy.off_peak_mode,
                reserve=energy.reserve,
                sleep_after=self.duration("energy.sleep_after", energy.sleep_after),
            ),
            previews=PreviewDefaults(
                stride=previews.stride,
                passes=passes,
                max_passes=previews.max_passes,
                overhead=previews.overhead,
                first_within=previews.first_within,
                cost_exponent=previews.cost_exponent,
            ),
            margin=self.duration("margin", raw.margin),
            reclaim_after=self.duration("reclaim_after", raw.reclaim_after),
            max_errors=raw.max_errors,
            frame_estimate=self.positive("frame_estimate", raw.frame_estimate),
            source=self.source,
        )

    def positive(self, field: str, value: float | str) -> float:
        seconds = self.duration(field, value)
        if not seconds > 0:
            raise self.fail(field, "must be more than zero")
        return seconds

    def tariffs(self, raw: list[_TariffIn]) -> tuple[Tariff, ...]:
        tariffs: list[Tariff] = []
        taken: dict[int, int] = {}
        for i, tariff in enumerate(raw):
            days: list[int] = []
            for k, day in enumerate(tariff.days):
                name = day.strip().lower()[:3]
                if name not in _DAYS:
                    raise self.fail(
                        f"tariffs[{i}].days[{k}]",
                        f"{day!r} is not a weekday (mon, tue, wed, thu, fri, sat, sun)",
                    )
                number = _DAYS.index(name)
                if number in taken:
                    raise self.fail(
                        f"tariffs[{i}].days[{k}]",
                        f"{_DAYS[number]} already has a tariff (tariffs[{taken[number]}])",
                    )
                taken[number] = i
                days.append(number)
            peak = tuple(
                self.hours(f"tariffs[{i}].peak_hours[{k}]", text)
                for k, text in enumerate(tariff.peak_hours)
            )
            tariffs.append(
                Tariff(
                    days=tuple(sorted(days)),
                    peak=peak,
                    peak_price=tariff.peak_price,
                    off_peak_price=tariff.off_peak_price,
                )
            )
        return tuple(tariffs)

    def hours(self, field: str, text: str) -> tuple[int, int]:
        found = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
        if found is None:
            raise self.fail(field, f"expected hours like '07:00-23:00', got {text!r}")
        h1, m1, h2, m2 = (int(g) for g in found.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if not (0 <= start < 1440 and 0 < end <= 1440 and m1 < 60 and m2 < 60):
            raise self.fail(field, f"{text!r} is not within 00:00-24:00")
        if end <= start:
            raise self.fail(field, f"{text!r} ends before it starts (split it at midnight)")
        return start, end


def config_changes(old: FarmConfig | None, new: FarmConfig) -> tuple[str, ...]:
    """Describe what changed between two configurations, one line per top-level field."""
    if old is None:
        return (f"loaded from {new.source or 'code'}",)
    before: Mapping[str, Any] = msgspec.to_builtins(old)
    after: Mapping[str, Any] = msgspec.to_builtins(new)
    changes = []
    for key in sorted(set(before) | set(after)):
        if key == "source":
            continue
        if before.get(key) != after.get(key):
            changes.append(f"{key}: {_short(before.get(key))} -> {_short(after.get(key))}")
    return tuple(changes)


def _short(value: Any) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= 120 else text[:117] + "..."
