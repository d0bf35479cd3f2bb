"""Forecast charts (PNG or SVG by the file's suffix), by matplotlib.

The only importer of matplotlib, an optional dependency (``pip install 'taskfarm[science]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from pathlib import Path

from runtime import ConfigurationError

from ._forecast import SeriesForecast

__all__ = ["forecast_chart"]


def forecast_chart(
    path: Path, forecasts: Sequence[SeriesForecast], *, first_day: date, title: str
) -> Path:
    """Draw each series' history, forecast and 80 % interval into ``path`` (.png or .svg).

    Raises:
        ConfigurationError: the suffix is neither .png nor .svg, or matplotlib is missing.
    """
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ConfigurationError(f"{path}: a chart is .png or .svg", where="--chart")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigurationError(
            "charts need matplotlib: pip install 'taskfarm[science]'", where="--chart"
        ) from None
    figure, axes = plt.subplots(figsize=(10, 4.5), dpi=100)
    try:
        for series in forecasts:
            # Matplotlib's date numbers: days since 1970-01-01.
            start = float((first_day - date(1970, 1, 1)).days)
            days = [start + k for k in range(len(series.history))]
            ahead = [days[-1] + k + 1.0 for k in range(len(series.forecast))]
            (line,) = axes.plot(days, series.history, linewidth=1.2, label=f"{series.name}")
            axes.plot(
                ahead,
                series.forecast,
                linestyle="--",
                linewidth=1.2,
                color=line.get_color(),
                label=f"{series.name}: {series.method.replace('_', ' ')}",
            )
            axes.fill_between(ahead, series.lower, series.upper, color=line.get_color(), alpha=0.15)
        axes.set_title(title)
        axes.set_ylabel("core-hours per day")
        axes.xaxis_date()
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper left")
        figure.autofmt_xdate()
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed date keeps an SVG byte-for-byte reproducible.
        metadata = {"Date": None} if suffix == ".svg" else {}
        figure.savefig(path, format=suffix[1:], metadata=metadata)
    finally:
        plt.close(figure)
    return path
