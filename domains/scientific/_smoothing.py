"""Exponential smoothing with an additive trend and season (Holt-Winters), by statsmodels.

The only importer of statsmodels, an optional dependency (``pip install 'taskfarm[science]'``):
without it the forecaster says so and uses its other methods.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

__all__ = ["available", "holt_winters"]


def available() -> bool:
    """Return whether statsmodels can be imported."""
    try:
        import statsmodels.tsa.holtwinters  # noqa: F401
    except ImportError:
        return False
    return True


def holt_winters(history: Sequence[float], horizon: int, season: int) -> list[float]:
    """Forecast ``horizon`` steps with additive trend and (given two seasons of history)
    additive season, damped so a trend does not run away over a long horizon.

    Raises:
        ImportError: statsmodels is not installed.
    """
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    seasonal = "add" if len(history) >= 2 * season else None
    model = ExponentialSmoothing(
        [float(v) for v in history],
        trend="add",
        damped_trend=True,
        seasonal=seasonal,
        seasonal_periods=season if seasonal else None,
        initialization_method="estimated",
    )
    with warnings.catch_warnings():
        # Convergence notes on short series are statsmodels' business, not the user's.
        warnings.simplefilter("ignore")
        fitted = model.fit(optimized=True)
        forecast = fitted.forecast(horizon)
    return [float(v) for v in forecast]
