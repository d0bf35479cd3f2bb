"""The render farm's own journaled facts, in the stream ``policy:render-farm``.

Configuration reloads and energy-mode changes come from commands; priority transitions and
deadline verdicts are facts the policy decides by itself each cycle (``cycle_events``).  All of
them are folded back into the policy with ``apply`` (after the commit, and on every restart), so
the journal is the only truth: what ``taskfarm audit`` reads is what the policy knew.
"""

from __future__ import annotations

from typing import Final, Literal

from persistence import Event, EventCodec

from ._config import EnergyMode, FarmConfig

__all__ = [
    "RENDER_CODEC",
    "DeadlineVerdictChanged",
    "EnergyModeChanged",
    "FarmConfigChanged",
    "PriorityChanged",
    "Verdict",
]

RENDER_CODEC: Final = EventCodec()

Verdict = Literal["on track", "at risk", "will miss"]


@RENDER_CODEC.register
class FarmConfigChanged(Event, frozen=True, kw_only=True, tag="render.config_changed"):
    """The farm configuration was loaded or reloaded (``changes`` says what, readably).
    ``by``: ``startup``, the client credential that reloaded it, or ``operator`` (the
    embedding application or a join-token client)."""

    config: FarmConfig
    changes: tuple[str, ...] = ()
    by: str = "operator"


@RENDER_CODEC.register
class EnergyModeChanged(Event, frozen=True, kw_only=True, tag="render.energy_mode_changed"):
    """The energy mode changed: set by an operator, by a reload, or automatically (``by``:
    ``auto``, ``startup``, the client credential that set it, or ``operator``)."""

    mode: EnergyMode
    previous: EnergyMode
    reason: str = ""
    by: str = "operator"


@RENDER_CODEC.register
class PriorityChanged(Event, frozen=True, kw_only=True, tag="render.priority_changed"):
    """A job's effective priority changed (its base priority is never touched)."""

    job_id: str
    previous: str
    current: str
    reason: str


@RENDER_CODEC.register
class DeadlineVerdictChanged(Event, frozen=True, kw_only=True, tag="render.deadline_verdict"):
    """A job's deadline verdict changed: on track, at risk (remaining work plus the margin
    reaches the deadline) or will miss (the remaining work alone does)."""

    job_id: str
    verdict: Verdict
    reason: str
