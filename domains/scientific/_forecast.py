"""Resource forecasting: daily core-hours per project and for the cluster, months ahead.

Three methods of the series alone: **seasonal naive** (each day as the same weekday last
week), **exponential smoothing** (Holt-Winters with a damped additive trend and an additive
weekly season, by statsmodels) and **linear trend** (least squares); and methods that know
more than the series (``informed``: called with the origin, a number of days of history, and
the horizon), such as the queue and arrivals method of ``_backlog``.  Each series gets the
method with the lowest WAPE (then MAE) in rolling-origin backtesting: from each of the last
``origins`` origins, a week apart, the method forecasts the next ``horizon`` days from what
was known at the origin.  The 80 % interval of a forecast is the method's own backtest errors
at each step ahead (their 10th and 90th percentiles), and its coverage is measured honestly:
at each origin, with an interval built from the *other* origins' errors only.

Scores.  **WAPE** (sum of absolute errors over sum of actuals, in %: MAPE weighted by volume)
is what chooses: daily core-hours of a project are lumpy (a few multi-day, multi-node stages
and empty days between), and MAPE divides by each day's usage, so one near-empty day swamps
it.  **Weekly WAPE** scores the 7-day totals (what capacity planning and grant reports use).
MAPE (over days with usage) and MAE are reported beside them.  With no usage in the scored
days WAPE is undefined: NaN, never a division error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from . import _smoothing

__all__ = [
    "METHODS",
    "Accuracy",
    "Informed",
    "SeriesForecast",
    "accuracy",
    "backtest",
    "backtest_informed",
    "forecast_series",
    "linear_trend",
    "seasonal_naive",
    "wape",
    "weekly_wape",
]

Method = Callable[[Sequence[float], int, int], list[float]]
# A method that knows more than the series: (origin, horizon) -> the forecast of the days
# ``origin`` to ``origin + horizon - 1`` made from what was known on day ``origin``.
Informed = Callable[[int, int], list[float]]


def seasonal_naive(history: Sequence[float], horizon: int, season: int) -> list[float]:
    """Repeat the last season (the last value, with less than one season of history)."""
    if not history:
        return [0.0] * horizon
    if len(history) < season:
        return [float(history[-1])] * horizon
    last = list(history[-season:])
    return [float(last[k % season]) for k in range(horizon)]


def linear_trend(history: Sequence[float], horizon: int, season: int) -> list[float]:
    """Extend the least-squares line through the history (never below zero)."""
    n = len(history)
    if n == 0:
        return [0.0] * horizon
    if n == 1:
        return [float(history[0])] * horizon
    mean_x = (n - 1) / 2
    mean_y = sum(history) / n
    sxx = sum((x - mean_x) ** 2 for x in range(n))
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(history)) / sxx
    return [max(0.0, mean_y + slope * (n + k - mean_x)) for k in range(horizon)]


def exponential_smoothing(history: Sequence[float], horizon: int, season: int) -> list[float]:
    """Holt-Winters (see ``_smoothing``), never below zero."""
    if len(history) < 4:
        return seasonal_naive(history, horizon, season)
    return [max(0.0, v) for v in _smoothing.holt_winters(history, horizon, season)]


METHODS: Mapping[str, Method] = {
    "seasonal_naive": seasonal_naive,
    "exponential_smoothing": exponential_smoothing,
    "linear_trend": linear_trend,
}


@dataclass(frozen=True)
class Accuracy:
    """How a method did in backtesting: WAPE and weekly WAPE (%, what chooses), MAPE (%),
    MAE, and 80 % interval coverage."""

    mape: float
    mae: float
    coverage: float | None
    origins: int
    wape: float = math.nan
    weekly_wape: float = math.nan


def accuracy(actual: Sequence[float], predicted: Sequence[float]) -> tuple[float, float]:
    """Return (MAPE in %, over days with usage; MAE)."""
    pairs = list(zip(actual, predicted, strict=True))
    if not pairs:
        return math.nan, math.nan
    mae = sum(abs(a - p) for a, p in pairs) / len(pairs)
    relative = [abs(a - p) / abs(a) for a, p in pairs if a != 0]
    mape = 100 * sum(relative) / len(relative) if relative else math.nan
    return mape, mae


def wape(actual: Sequence[float], predicted: Sequence[float]) -> float:
    """Return the WAPE in %: sum |actual - predicted| / sum |actual| (NaN, undefined, when
    nothing was used: a forecast of an empty window has no relative error)."""
    pairs = list(zip(actual, predicted, strict=True))
    volume = sum(abs(a) for a, _ in pairs)
    if volume == 0:
        return math.nan
    return 100 * sum(abs(a - p) for a, p in pairs) / volume


def weekly_wape(actual: Sequence[float], predicted: Sequence[float], *, season: int = 7) -> float:
    """Return the WAPE in % of the totals of each complete ``season`` days (a trailing
    partial week is left out; NaN without one complete week or without usage)."""
    weeks = len(actual) // season
    if len(predicted) != len(actual):
        raise ValueError("actual and predicted differ in length")
    totals = [
        (sum(actual[w * season : (w + 1) * season]), sum(predicted[w * season : (w + 1) * season]))
        for w in range(weeks)
    ]
    return wape([a for a, _ in totals], [p for _, p in totals])


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def backtest(
    history: Sequence[float],
    method: Method,
    *,
    season: int,
    origins: int,
    horizon: int,
    level: float = 0.8,
) -> tuple[Accuracy, list[list[float]]]:
    """Rolling-origin backtest: return the accuracy and the errors (actual - predicted) at
    each step ahead, one list per origin."""
    return backtest_informed(
        history,
        lambda origin, ahead: method(history[:origin], ahead, season),
        season=season,
        origins=origins,
        horizon=horizon,
        level=level,
    )


def backtest_informed(
    history: Sequence[float],
    method: Informed,
    *,
    season: int,
    origins: int,
    horizon: int,
    level: float = 0.8,
) -> tuple[Accuracy, list[list[float]]]:
    """:func:`backtest` for a method called with the origin (what it may know is up to it:
    the informed methods here read only what was journaled before that day)."""
    n = len(history)
    starts = [n - horizon - k * season for k in range(origins)]
    starts = sorted(s for s in starts if s >= max(season, 4))
    errors: list[list[float]] = []
    actual_all: list[float] = []
    predicted_all: list[float] = []
    weekly: list[tuple[float, float]] = []
    for start in starts:
        predicted = method(start, horizon)
        actual = history[start : start + horizon]
        errors.append([a - p for a, p in zip(actual, predicted, strict=True)])
        actual_all.extend(actual)
        predicted_all.extend(predicted)
        for w in range(len(actual) // season):
            week = slice(w * season, (w + 1) * season)
            weekly.append((sum(actual[week]), sum(predicted[week])))
    mape, mae = accuracy(actual_all, predicted_all)
    covered = total = 0
    if len(errors) > 1:
        tail = (1 - level) / 2
        for k, own in enumerate(errors):
            others = [e for j, e in enumerate(errors) if j != k]
            for step, error in enumerate(own):
                at_step = [e[step] for e in others]
                low, high = _quantile(at_step, tail), _quantile(at_step, 1 - tail)
                total += 1
                covered += low <= error <= high
    coverage = covered / total if total else None
    found = Accuracy(
        mape=mape,
        mae=mae,
        coverage=coverage,
        origins=len(errors),
        wape=wape(actual_all, predicted_all),
        weekly_wape=wape([a for a, _ in weekly], [p for _, p in weekly]),
    )
    return found, errors


def _at_origin(history: Sequence[float], method: Method, season: int) -> Informed:
    """A method of the series alone, as one called with the origin."""
    return lambda origin, horizon: method(history[:origin], horizon, season)


@dataclass(frozen=True)
class SeriesForecast:
    """A series' chosen method, every method's backtest, and the forecast with its interval."""

    name: str
    history: tuple[float, ...]
    method: str
    accuracies: Mapping[str, Accuracy]
    forecast: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    note: str = ""


def forecast_series(
    name: str,
    history: Sequence[float],
    *,
    horizon: int,
    season: int = 7,
    origins: int = 6,
    backtest_horizon: int = 14,
    level: float = 0.8,
    methods: Sequence[str] | None = None,
    informed: Mapping[str, Informed] | None = None,
) -> SeriesForecast:
    """Backtest every method (those of ``METHODS`` named in ``methods``, all by default, and
    every ``informed`` one), pick the best, and forecast ``horizon`` days with an interval."""
    chosen_methods = list(METHODS if methods is None else methods)
    note = ""
    if "exponential_smoothing" in chosen_methods and not _smoothing.available():
        chosen_methods.remove("exponential_smoothing")
        note = "exponential smoothing needs statsmodels: pip install 'taskfarm[science]'"
    candidates: dict[str, Informed] = {
        name: _at_origin(history, METHODS[name], season) for name in chosen_methods
    }
    candidates.update(informed or {})
    if not candidates:
        raise ValueError("forecast_series needs at least one method")
    step = max(1, min(backtest_horizon, len(history) // 3))
    results: dict[str, tuple[Accuracy, list[list[float]]]] = {}
    for label, method in candidates.items():
        results[label] = backtest_informed(
            history, method, season=season, origins=origins, horizon=step, level=level
        )

    def key(item: tuple[str, tuple[Accuracy, list[list[float]]]]) -> tuple[float, float, str]:
        found = item[1][0]
        score = found.wape if math.isfinite(found.wape) else math.inf
        mae = found.mae if math.isfinite(found.mae) else math.inf
        return (score, mae, item[0])

    best, (_, errors) = min(results.items(), key=key)
    predicted = candidates[best](len(history), horizon)
    tail = (1 - level) / 2
    lower, upper = [], []
    for k, value in enumerate(predicted):
        at_step = [e[min(k, len(e) - 1)] for e in errors if e]
        # Beyond the backtest horizon the spread grows like a random walk's.
        grow = math.sqrt((k + 1) / step) if k >= step else 1.0
        low = _quantile(at_step, tail) * grow if at_step else 0.0
        high = _quantile(at_step, 1 - tail) * grow if at_step else 0.0
        # Empirical errors may all lie on one side (a biased method): the point forecast
        # stays inside its interval all the same.
        lower.append(max(0.0, min(value, value + low)))
        upper.append(max(0.0, value, value + high))
    return SeriesForecast(
        name=name,
        history=tuple(float(v) for v in history),
        method=best,
        accuracies={m: r[0] for m, r in results.items()},
        forecast=tuple(predicted),
        lower=tuple(lower),
        upper=tuple(upper),
        note=note,
    )
