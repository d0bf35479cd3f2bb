"""The science policy's own journaled facts, in the stream ``policy:science``.

Commands (``taskfarm science reserve ...``) decide and return these; the engine journals them
and folds them back into the policy (and replays them on every start), so reservations,
maintenance windows and pins are a projection of the journal, never a second truth.  Each
records who asked (``by``: the client credential the coordinator authenticated), fields added
with defaults so events journaled before them decode unchanged.
"""

from __future__ import annotations

from persistence import Event, EventCodec

from ._config import MaintenanceWindow, Reservation

__all__ = [
    "SCIENCE_CODEC",
    "MaintenanceCancelled",
    "MaintenanceScheduled",
    "MemberPinned",
    "ReservationCancelled",
    "ReservationMade",
]

SCIENCE_CODEC = EventCodec()


@SCIENCE_CODEC.register
class ReservationMade(Event, frozen=True, kw_only=True, tag="science.reservation_made"):
    """Nodes are held for a simulation from a start time (backfill may use them until then)."""

    reservation: Reservation


@SCIENCE_CODEC.register
class ReservationCancelled(Event, frozen=True, kw_only=True, tag="science.reservation_cancelled"):
    """A reservation was withdrawn before its end (``by``: who withdrew it, as
    ``Reservation.by``)."""

    name: str
    reason: str = ""
    by: str = ""


@SCIENCE_CODEC.register
class MaintenanceScheduled(Event, frozen=True, kw_only=True, tag="science.maintenance_scheduled"):
    """Nodes go out of service for a window (they drain before it, return after it)."""

    window: MaintenanceWindow


@SCIENCE_CODEC.register
class MaintenanceCancelled(Event, frozen=True, kw_only=True, tag="science.maintenance_cancelled"):
    """A maintenance window was called off (``by``: who called it off, as
    ``MaintenanceWindow.by``)."""

    name: str
    reason: str = ""
    by: str = ""


@SCIENCE_CODEC.register
class MemberPinned(Event, frozen=True, kw_only=True, tag="science.member_pinned"):
    """A sweep member is kept running whatever successive halving decides (or no longer);
    ``by``: who pinned or unpinned it, as ``Reservation.by``."""

    job_id: str
    pinned: bool = True
    reason: str = ""
    by: str = ""
