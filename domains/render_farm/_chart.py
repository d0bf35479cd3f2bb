"""The schedule as a Gantt chart: one row per node, what runs there now (solid) and what the
forecast plans next (hatched), coloured by client, with "now" and each job's deadline.

SVG is written with the standard library (the core install stays light); PNG needs matplotlib
(``pip install 'taskfarm[render]'``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from runtime import ConfigurationError

__all__ = ["write_chart"]

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")
_ROW = 18
_LEFT = 140
_WIDTH = 1000


def write_chart(data: Mapping[str, Any], path: Path) -> int:
    """Write the chart of a ``chart`` reply to ``path`` (``.svg`` or ``.png``); return the
    number of bars drawn.

    Raises:
        ConfigurationError: another suffix, or PNG without matplotlib (naming ``--out``).
    """
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ConfigurationError(f"{path}: a chart is .svg or .png", where="--out")
    bars = list(data.get("bars", []))
    if suffix == ".png":
        _png(data, bars, path)
    else:
        path.write_text(_svg(data, bars), encoding="utf-8")
    return len(bars)


def _times(data: Mapping[str, Any], bars: list[Mapping[str, Any]]) -> tuple[float, float]:
    now = datetime.fromisoformat(str(data["now"])).timestamp()
    starts = [datetime.fromisoformat(b["start"]).timestamp() for b in bars] or [now]
    ends = [datetime.fromisoformat(b["end"]).timestamp() for b in bars] or [now + 3600]
    last = max(max(ends), now + 60)
    # The deadlines of the jobs drawn, up to a day past the last bar.
    shown = {str(b["job"]) for b in bars}
    for job, deadline in dict(data.get("deadlines", {})).items():
        if job in shown:
            last = max(last, min(datetime.fromisoformat(deadline).timestamp(), last + 86400))
    return min(min(starts), now), last


def _colours(bars: list[Mapping[str, Any]]) -> dict[str, str]:
    clients = sorted({str(b.get("client") or "-") for b in bars})
    return {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(clients)}


def _svg(data: Mapping[str, Any], bars: list[Mapping[str, Any]]) -> str:
    nodes = sorted({str(b["node"]) for b in bars})
    first, last = _times(data, bars)
    span = max(1.0, last - first)
    colours = _colours(bars)
    height = (len(nodes) + 3) * _ROW

    def x(iso: str) -> float:
        return _LEFT + (datetime.fromisoformat(iso).timestamp() - first) / span * _WIDTH

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LEFT + _WIDTH + 20}" '
        f'height="{height}" font-family="sans-serif" font-size="11">',
        '<defs><pattern id="planned" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="white" '
        'fill-opacity="0.6"/></pattern></defs>',
        f'<text x="4" y="12">schedule at {html.escape(str(data["now"]))} (solid: running, '
        "hatched: forecast)</text>",
    ]
    row = {node: i for i, node in enumerate(nodes)}
    for node, i in row.items():
        y = (i + 1) * _ROW + 6
        parts.append(f'<text x="4" y="{y + 12}">{html.escape(node)}</text>')
    for bar in bars:
        y = (row[str(bar["node"])] + 1) * _ROW + 6
        left, right = x(bar["start"]), x(bar["end"])
        colour = colours[str(bar.get("client") or "-")]
        title = html.escape(f"{bar['job']} task {bar['task']} ({bar['start']} - {bar['end']})")
        parts.append(
            f'<rect x="{left:.1f}" y="{y}" width="{max(1.0, right - left):.1f}" '
            f'height="{_ROW - 4}" fill="{colour}"><title>{title}</title></rect>'
        )
        if bar.get("planned"):
            parts.append(
                f'<rect x="{left:.1f}" y="{y}" width="{max(1.0, right - left):.1f}" '
                f'height="{_ROW - 4}" fill="url(#planned)"/>'
            )
    bottom = (len(nodes) + 1) * _ROW + 6
    now = x(str(data["now"]))
    parts.append(f'<line x1="{now:.1f}" y1="{_ROW}" x2="{now:.1f}" y2="{bottom}" stroke="black"/>')
    for job, deadline in sorted(dict(data.get("deadlines", {})).items()):
        at = x(deadline)
        if _LEFT <= at <= _LEFT + _WIDTH:
            parts.append(
                f'<line x1="{at:.1f}" y1="{_ROW}" x2="{at:.1f}" y2="{bottom}" stroke="red" '
                f'stroke-dasharray="4 3"><title>{html.escape(job)} deadline</title></line>'
            )
    legend = "  ".join(f"{c}" for c in colours)
    parts.append(f'<text x="4" y="{bottom + 14}">clients: {html.escape(legend)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _png(data: Mapping[str, Any], bars: list[Mapping[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise ConfigurationError(
            f"{path}: PNG needs matplotlib (pip install 'taskfarm[render]'), or write .svg",
            where="--out",
        ) from None
    nodes = sorted({str(b["node"]) for b in bars})
    row = {node: i for i, node in enumerate(nodes)}
    colours = _colours(bars)
    figure, axes = pyplot.subplots(figsize=(12, max(2.0, 0.3 * len(nodes) + 1)))
    for bar in bars:
        start = datetime.fromisoformat(bar["start"]).timestamp()
        end = datetime.fromisoformat(bar["end"]).timestamp()
        axes.barh(
            row[str(bar["node"])],
            max(1.0, end - start),
            left=start,
            color=colours[str(bar.get("client") or "-")],
            hatch="//" if bar.get("planned") else None,
            alpha=0.6 if bar.get("planned") else 1.0,
        )
    axes.axvline(datetime.fromisoformat(str(data["now"])).timestamp(), color="black")
    for deadline in dict(data.get("deadlines", {})).values():
        axes.axvline(datetime.fromisoformat(deadline).timestamp(), color="red", linestyle="--")
    axes.set_yticks(range(len(nodes)), nodes)
    axes.set_xlabel("time (POSIX seconds)")
    axes.set_title(f"schedule at {data['now']} (hatched: forecast)")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
