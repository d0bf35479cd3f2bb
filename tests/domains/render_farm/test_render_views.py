"""What the operator reads: the status table (frame strip, per-frame time, ETA, verdict,
priority and why, preview), the clients' shares, previews, the audit, and the Gantt chart as
SVG (standard library) or PNG (matplotlib)."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from domains.render_farm._audit import AuditEntry, AuditProjection
from domains.render_farm._chart import write_chart
from domains.render_farm._views import (
    format_audit,
    format_clients,
    format_previews,
    format_status,
)
from runtime import ConfigurationError

ROW: dict[str, Any] = {
    "job": "shot010",
    "client": "acme",
    "type": "animation",
    "frames_done": 24,
    "frames_total": 96,
    "strip": "######>>>.......",
    "per_frame_s": 130.0,
    "measured": True,
    "eta": "2026-03-02T14:05:00+00:00",
    "deadline": "2026-03-02T18:00:00+00:00",
    "verdict": "will meet",
    "margin_s": 7200.0,
    "priority": "high",
    "base_priority": "medium",
    "why": "high: deadline in 9h00m (< 24 h)",
    "preview": "/farm/shot010/previews/q0.5.png",
    "preemptions": 1,
    "held": None,
}


def test_the_status_table_shows_what_a_wrangler_needs() -> None:
    """Client, frames done/total and the strip, per-frame time, ETA, deadline, verdict,
    effective priority (and its base) and why, preemptions and the latest preview."""
    text = format_status([ROW])
    assert "shot010" in text
    assert "24/96" in text
    assert "[######>>>.......]" in text
    assert "2m" in text  # 130 s a frame
    assert "03-02 14:05" in text
    assert "03-02 18:00" in text
    assert "will meet" in text
    assert "high (base medium)" in text
    assert "deadline in 9h00m" in text
    assert "preempted 1 time(s)" in text
    assert "preview: /farm/shot010/previews/q0.5.png" in text
    assert "2h00m margin" in text
    assert format_status([]) == "no render jobs are running or waiting"


def test_a_job_without_a_client_keeps_the_status_columns_in_place() -> None:
    """A blank client shows as "-", so the row splits into as many columns as the header."""
    header, row = format_status([{**ROW, "client": ""}]).splitlines()[:2]
    assert row.split()[1:3] == ["-", "24/96"]
    assert row[header.index("CLIENT")] == "-"


def test_the_clients_table_shows_guaranteed_used_borrowed_and_lent() -> None:
    """Each client's shares in percent and the loans it holds, against which lender."""
    rows = [
        {
            "client": "acme",
            "tier": "premium",
            "guaranteed": 50.0,
            "maximum": 80.0,
            "used": 70.0,
            "borrowed": 20.0,
            "lent": 0.0,
            "waiting": False,
            "loans": {"blue": 20.0},
        },
        {
            "client": "blue",
            "tier": "basic",
            "guaranteed": 50.0,
            "maximum": 100.0,
            "used": 10.0,
            "borrowed": 0.0,
            "lent": 20.0,
            "waiting": True,
            "loans": {},
        },
    ]
    text = format_clients(rows)
    assert "acme" in text
    assert "blue 20 %" in text
    assert "(work waiting)" in text
    lines = text.splitlines()
    assert "70.0%" in lines[1]
    assert "20.0%" in lines[2]


def test_previews_are_listed_with_quality_frames_and_path() -> None:
    """One line per preview; a job without any says so."""
    rows = [
        {
            "task": 0,
            "frames": [1, 49],
            "quality": 0.25,
            "path": "/p/q.png",
            "at": "2026-03-02T09:01:00+00:00",
        },
        {
            "task": 2,
            "frames": [1, 1],
            "quality": 1.0,
            "path": "/p/1.png",
            "at": "2026-03-02T09:03:00+00:00",
        },
    ]
    text = format_previews("shot", rows)
    assert "0.25" in text
    assert "1-49" in text
    assert "/p/1.png" in text
    assert format_previews("shot", []) == "job shot has produced no preview yet"


def test_the_audit_prints_the_timeline_then_the_figures() -> None:
    """Entries in order, then jobs, on-time rate, turnaround per client and energy."""
    entry = AuditEntry(
        at=datetime(2026, 3, 2, 9, tzinfo=UTC), kind="preempted", text="task 3 preempted", job="a"
    )
    figures = AuditProjection().metrics()
    figures.update(
        {
            "jobs": 2,
            "finished": 2,
            "on_time": 1,
            "with_deadline": 2,
            "on_time_rate": 0.5,
            "turnaround_s": {"acme": {"jobs": 1, "mean": 3600.0, "median": 3600.0}},
        }
    )
    text = format_audit([entry], figures)
    assert text.splitlines()[0].startswith("2026-03-02T09:00:00+00:00  preempted")
    assert "on time 1/2 (50.0 %)" in text
    assert "turnaround acme: 1 jobs, median 1h00m" in text
    assert "energy 0.0 kWh" in text


CHART: dict[str, Any] = {
    "now": "2026-03-02T10:00:00+00:00",
    "bars": [
        {"node": "n1", "job": "a", "task": 0, "start": "2026-03-02T09:00:00+00:00",
         "end": "2026-03-02T10:30:00+00:00", "planned": False, "client": "acme"},
        {"node": "n2", "job": "b", "task": 1, "start": "2026-03-02T10:30:00+00:00",
         "end": "2026-03-02T11:00:00+00:00", "planned": True, "client": "blue"},
    ],
    "deadlines": {"a": "2026-03-02T12:00:00+00:00"},
    "completion": {"a": "2026-03-02T10:30:00+00:00"},
}  # fmt: skip


def test_the_gantt_chart_is_written_as_svg_and_png(tmp_path: Path) -> None:
    """An SVG with a bar per attempt (the forecast hatched) and the deadline; a PNG through
    matplotlib; another suffix is refused naming --out."""
    svg = tmp_path / "schedule.svg"
    assert write_chart(CHART, svg) == 2
    root = ElementTree.parse(svg).getroot()
    rects = [e for e in root.iter() if e.tag.endswith("rect") and e.find("{*}title") is not None]
    assert len(rects) == 2
    assert any(e.get("fill") == "url(#planned)" for e in root.iter() if e.tag.endswith("rect"))
    assert "a deadline" in svg.read_text()
    png = tmp_path / "schedule.png"
    assert write_chart(CHART, png) == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigurationError, match=r"--out: .*a chart is \.svg or \.png"):
        write_chart(CHART, tmp_path / "schedule.pdf")
