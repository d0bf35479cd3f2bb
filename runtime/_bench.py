"""The benchmark harness: every figure is printed beside a baseline measured in the same run.

A suite is an async function ``(BenchContext) -> list[Figure]`` registered under the
``taskfarm.benchmarks`` entry-point group.  Targets are stated, not asserted: the table says
whether each was met on this machine, this run.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["BenchContext", "Figure", "Suite", "format_table", "percentile"]


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One measured figure, its same-run baseline and its target."""

    name: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    target: float | None = None
    # "higher": bigger is better (throughput); "lower": smaller is better (latency, memory).
    better: Literal["higher", "lower"] = "higher"
    # Optional target on value / baseline (e.g. >= 0.5x a raw loop).
    ratio_target: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Return value / baseline, when there is a baseline."""
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        """Return whether every stated target is met (None when there is none)."""
        checks: list[bool] = []
        if self.target is not None:
            checks.append(
                self.value >= self.target if self.better == "higher" else self.value <= self.target
            )
        ratio = self.ratio
        if self.ratio_target is not None and ratio is not None:
            checks.append(
                ratio >= self.ratio_target
                if self.better == "higher"
                else ratio <= self.ratio_target
            )
        return all(checks) if checks else None


@dataclass(kw_only=True)
class BenchContext:
    """What a suite gets: a scratch folder, the size switch, and a progress callback."""

    workdir: Path
    quick: bool = False
    progress: Callable[[str], None] = field(default=lambda _message: None)


Suite = Callable[[BenchContext], Awaitable[list[Figure]]]


def percentile(samples: Sequence[float], q: float) -> float:
    """Return the ``q`` percentile (0-100) of ``samples`` by nearest rank."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _number(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"
    return f"{text} {unit}".strip()


def format_table(figures: Sequence[Figure]) -> str:
    """Render figures as a Markdown table (pasteable into the README)."""
    header = ("figure", "measured", "baseline (same run)", "ratio", "target", "met")
    rows = [header]
    for fig in figures:
        baseline = (
            f"{fig.baseline_name}: {_number(fig.baseline_value, fig.unit)}"
            if fig.baseline_name
            else "-"
        )
        ratio = fig.ratio
        sign = ">=" if fig.better == "higher" else "<="
        targets = []
        if fig.target is not None:
            targets.append(f"{sign} {_number(fig.target, fig.unit)}")
        if fig.ratio_target is not None:
            targets.append(f"{sign} {fig.ratio_target:g}x baseline")
        met = {True: "yes", False: "**no**", None: "-"}[fig.met]
        rows.append(
            (
                fig.name + (f" ({fig.note})" if fig.note else ""),
                _number(fig.value, fig.unit),
                baseline,
                "-" if ratio is None else f"{ratio:.2f}x",
                ", ".join(targets) or "-",
                met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
