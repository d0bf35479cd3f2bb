"""What an operator reads: the render status, the clients' shares, previews and the audit, as
text -- pure functions of the policy's replies and the audit's projection."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._audit import AuditEntry
from ._deadline import format_seconds

__all__ = ["format_audit", "format_clients", "format_previews", "format_status"]


def _clock(iso: str | None) -> str:
    """``2026-03-02T14:05:00+00:00`` -> ``03-02 14:05`` (the reader's farm is in one year)."""
    if not iso:
        return "-"
    return iso[5:16].replace("T", " ")


def format_status(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render ``taskfarm render status``: per job its client, frames as a strip, per-frame time,
    ETA and deadline verdict, effective priority and why, and the latest preview."""
    if not rows:
        return "no render jobs are running or waiting"
    lines = [
        f"{'JOB':<28} {'CLIENT':<10} {'FRAMES':<12} {'PER FRAME':>10}  {'ETA':<11} "
        f"{'DEADLINE':<11} {'VERDICT':<10} PRIORITY"
    ]
    for row in rows:
        frames = f"{row['frames_done']}/{row['frames_total']}"
        per_frame = format_seconds(float(row["per_frame_s"])) + ("" if row["measured"] else "?")
        priority = row["priority"]
        if row["priority"] != row["base_priority"]:
            priority += f" (base {row['base_priority']})"
        lines.append(
            f"{row['job']:<28} {row['client'] or '-':<10} {frames:<12} {per_frame:>10}  "
            f"{_clock(row['eta']):<11} {_clock(row['deadline']):<11} {row['verdict']:<10} "
            f"{priority}"
        )
        lines.append(f"    [{row['strip']}]  {row['why']}")
        if row.get("held"):
            lines.append(f"    held: {row['held']}")
        if row.get("preemptions"):
            lines.append(f"    preempted {row['preemptions']} time(s)")
        if row.get("preview"):
            lines.append(f"    preview: {row['preview']}")
    margin = format_seconds(float(rows[0]["margin_s"]))
    lines.append(
        f"(per frame: measured, or an estimate marked ?; verdicts with a {margin} margin; "
        "strip: # done, > running, . waiting)"
    )
    return "\n".join(lines)


def format_clients(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render ``taskfarm render clients``: guaranteed, maximum, used, borrowed and lent."""
    lines = [
        f"{'CLIENT':<14} {'TIER':<9} {'GUARANTEED':>10} {'MAXIMUM':>8} {'USED':>7} "
        f"{'BORROWED':>9} {'LENT':>7}  LOANS"
    ]
    for row in rows:
        loans = ", ".join(f"{k} {v:g} %" for k, v in sorted(row["loans"].items())) or "-"
        lines.append(
            f"{row['client']:<14} {row['tier']:<9} {row['guaranteed']:>9.1f}% "
            f"{row['maximum']:>7.0f}% {row['used']:>6.1f}% {row['borrowed']:>8.1f}% "
            f"{row['lent']:>6.1f}%  {loans}" + ("  (work waiting)" if row["waiting"] else "")
        )
    return "\n".join(lines)


def format_previews(job: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Render ``taskfarm render previews JOB``: each preview, its quality, frames and file."""
    if not rows:
        return f"job {job} has produced no preview yet"
    lines = [f"{'AT':<12} {'TASK':>5} {'QUALITY':>8} {'FRAMES':<12} PATH"]
    for row in rows:
        frames = row["frames"]
        shown = (
            "-"
            if not frames
            else (str(frames[0]) if frames[0] == frames[1] else f"{frames[0]}-{frames[1]}")
        )
        lines.append(
            f"{_clock(row['at']):<12} {row['task']:>5} {row['quality']:>8g} {shown:<12} "
            f"{row['path']}"
        )
    return "\n".join(lines)


def format_audit(entries: Sequence[AuditEntry], figures: Mapping[str, Any]) -> str:
    """Render ``taskfarm audit``: the timeline, then the figures."""
    lines = [
        f"{entry.at.isoformat(timespec='seconds')}  {entry.kind:<12} "
        f"{(entry.job or entry.node or '-'):<24} {entry.text}"
        for entry in entries
    ]
    if not lines:
        lines.append("(nothing in the journal matches)")
    lines.append("")
    rate = figures.get("on_time_rate")
    utilization = figures.get("utilization")
    lines.append(
        f"jobs {figures['jobs']} ({figures['finished']} finished); on time "
        f"{figures['on_time']}/{figures['with_deadline']}"
        + (f" ({rate * 100:.1f} %)" if rate is not None else "")
        + (f"; utilization {utilization * 100:.1f} %" if utilization is not None else "")
        + f"; preemptions {figures['preemptions']}, failed attempts {figures['failures']}, "
        f"lost {figures['lost']}"
    )
    for client, turnaround in figures["turnaround_s"].items():
        lines.append(
            f"turnaround {client}: {turnaround['jobs']} jobs, median "
            f"{format_seconds(turnaround['median'])}, mean {format_seconds(turnaround['mean'])}"
        )
    energy = figures["energy"]
    lines.append(
        f"energy {energy['kwh']:,.1f} kWh, cost {energy['cost']:,.2f} "
        f"(idle {energy.get('idle_kwh', 0.0):,.1f} kWh)"
    )
    for client, spent in energy.get("per_client", {}).items():
        lines.append(f"  client {client}: {spent['kwh']:,.1f} kWh, cost {spent['cost']:,.2f}")
    for mode, spent in energy.get("per_mode", {}).items():
        lines.append(f"  mode {mode}: {spent['kwh']:,.1f} kWh, cost {spent['cost']:,.2f}")
    return "\n".join(lines)
