"""Energy: modes, power, cost across tariff boundaries, off-peak deferral, sleeping -- pure.

The mode changes placement (see ``_specialization.PACKING``), deferral and sleeping, never the
wattage table:

| mode          | sleeps idle nodes        | defers energy-intensive work to off-peak |
|---------------|--------------------------|------------------------------------------|
| performance   | never (wakes them all)   | no                                       |
| balanced      | after ``sleep_after``    | no                                       |
| efficiency    | after half of it         | no                                       |
| night-savings | after half of it         | yes, unless that endangers its deadline  |

A node draws ``idle + (busy - idle) x (share of its cores in use)`` watts awake and ``sleep``
watts asleep.  Energy cost is power x time x the price in force, integrated across every tariff
boundary of the interval.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from ._config import EnergyMode, FarmConfig
from ._deadline import format_seconds

__all__ = [
    "DEFERRAL_SAFETY",
    "SLEEP_AFTER_FACTOR",
    "Deferral",
    "PriceTimeline",
    "defer_to_off_peak",
    "node_power",
    "plan_sleep",
]

# Multiplier of ``sleep_after`` per mode (None: never sleep).
SLEEP_AFTER_FACTOR: Final[Mapping[EnergyMode, float | None]] = {
    "performance": None,
    "balanced": 1.0,
    "efficiency": 0.5,
    "night-savings": 0.5,
}
# Deferred work starts together at the off-peak boundary and shares the farm: it is deferred
# only when it would still finish with its remaining work counted this many times over.
DEFERRAL_SAFETY: Final = 2.0


def node_power(idle: float, busy: float, sleep: float, *, used: float, asleep: bool) -> float:
    """Return a node's draw in watts (``used`` is the fraction of its cores in use)."""
    if asleep:
        return sleep
    return idle + (busy - idle) * min(1.0, max(0.0, used))


@dataclass(frozen=True, slots=True)
class Deferral:
    """Hold energy-intensive work until ``until`` (the end of the peak), and why."""

    until: datetime
    reason: str


def defer_to_off_peak(
    *,
    mode: EnergyMode,
    energy_intensive: bool,
    now: datetime,
    deadline: datetime | None,
    remaining_s: float,
    margin_s: float,
    config: FarmConfig,
) -> Deferral | None:
    """Return a deferral to off-peak for night-savings mode, or None to run now.

    Only energy-intensive work, only during peak hours, and only when the job would still
    finish before its deadline with the margin, starting at off-peak with its remaining work
    counted ``DEFERRAL_SAFETY`` times (deferred work starts together and shares the farm).
    """
    if mode != "night-savings" or not energy_intensive or not config.is_peak(now):
        return None
    until = config.next_off_peak(now)
    if until <= now:
        return None
    if deadline is not None:
        finish = until + timedelta(seconds=DEFERRAL_SAFETY * remaining_s + margin_s)
        if finish > deadline:
            return None
        slack = f"; deadline {deadline.isoformat()} still met"
    else:
        slack = ""
    price_now, price_then = config.price(now), config.price(until)
    return Deferral(
        until=until,
        reason=(
            "night-savings: energy-intensive, deferred "
            f"{format_seconds((until - now).total_seconds())} to off-peak at "
            f"{until.isoformat()} ({price_now:g} -> {price_then:g} per kWh){slack}"
        ),
    )


def plan_sleep(
    idle: list[tuple[str, datetime]],
    *,
    reserve: int,
    now: datetime,
    sleep_after: float,
) -> list[str]:
    """Return the idle nodes to put to sleep: ``idle`` is (node, idle since) with the nodes to
    keep awake first; the first ``reserve`` stay awake, the others sleep once idle long enough."""
    chosen = []
    for name, since in idle[reserve:]:
        if (now - since).total_seconds() >= sleep_after:
            chosen.append(name)
    return chosen


class PriceTimeline:
    """The price in force over ``[start, end]``, as boundaries: integrates power x time x price
    across tariff boundaries with a binary search per interval."""

    def __init__(self, config: FarmConfig, start: datetime, end: datetime) -> None:
        self.times: list[float] = [start.timestamp()]
        self.prices: list[float] = [config.price(start)]
        moment = start
        while True:
            following = config.next_price_change(moment)
            if following is None or following > end:
                break
            self.times.append(following.timestamp())
            self.prices.append(config.price(following))
            moment = following

    def price_at(self, at: float) -> float:
        """Return the price at a POSIX time."""
        index = max(0, bisect.bisect_right(self.times, at) - 1)
        return self.prices[index]

    def energy(self, watts: float, start: float, end: float) -> tuple[float, float]:
        """Return (kWh, cost) of drawing ``watts`` from ``start`` to ``end`` (POSIX seconds)."""
        if end <= start or watts <= 0:
            return 0.0, 0.0
        kwh = watts * (end - start) / 3_600_000
        cost = 0.0
        index = max(0, bisect.bisect_right(self.times, start) - 1)
        moment = start
        while moment < end:
            boundary = self.times[index + 1] if index + 1 < len(self.times) else end
            stop = min(end, boundary)
            cost += watts * (stop - moment) / 3_600_000 * self.prices[index]
            moment = stop
            index = min(index + 1, len(self.prices) - 1)
        return kwh, cost
