"""What measured usage looks like on the wire: an agent's samples, ``taskfarm usage``'s question
and its answer.

An agent's :class:`NodeUsage` rides on a ``Heartbeat`` (at most one per sample interval), and
is bounded like everything else the coordinator decodes: ids and counts have maxima, and a
sample names at most :data:`MAX_SAMPLED_ATTEMPTS` attempts (an agent running more reports the
first that many).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from actors.executors import AttemptUsage, HostUsage
from runtime import Message

__all__ = [
    "MAX_SAMPLED_ATTEMPTS",
    "JobUsageNow",
    "NodeUsage",
    "NodeUsageNow",
    "UsagePoint",
    "UsageReply",
    "UsageRequest",
]

MAX_SAMPLED_ATTEMPTS = 4096
_Identifier = Annotated[str, msgspec.Meta(max_length=256)]


class NodeUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One sample of an agent: its host, and each running attempt's usage so far."""

    host: HostUsage
    attempts: Annotated[
        tuple[AttemptUsage, ...], msgspec.Meta(max_length=MAX_SAMPLED_ATTEMPTS)
    ] = ()


class UsageRequest(
    Message, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="client.usage"
):
    """Ask for measured usage: of one node, of one job, or of the whole farm, from ``since``
    (default: the last hour) per minute or per hour (``auto``: minutes while they are kept)."""

    node: _Identifier | None = None
    job: _Identifier | None = None
    since: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    resolution: Literal["auto", "minute", "hour"] = "auto"


class UsagePoint(msgspec.Struct, frozen=True, kw_only=True):
    """One bucket of a usage series, summed over the nodes and jobs asked about.

    ``cpu_s`` is the CPU seconds used in the bucket (``cpu_cores`` the same per second);
    ``rss_max`` the sum of each job's (or node's) largest resident memory in it; the host
    fields are the highest load and the least memory available and scratch space free.
    """

    at: datetime
    samples: int = 0
    cpu_s: float = 0.0
    cpu_cores: float = 0.0
    rss_max: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    load_max: float = 0.0
    memory_available_min: int = 0
    scratch_free_min: int = 0
    attempts_max: int = 0


class NodeUsageNow(msgspec.Struct, frozen=True, kw_only=True):
    """A connected node's last sample: its host and the attempts it runs (resident memory
    summed, CPU in cores since the sample before)."""

    node: str
    at: datetime
    load: float
    memory_available: int
    scratch_free: int
    attempts: int
    rss: int
    cpu_cores: float


class JobUsageNow(msgspec.Struct, frozen=True, kw_only=True):
    """A job's running attempts as last sampled: how many, the CPU seconds they used so far,
    their resident memory now (summed) and at its peak (the largest), CPU in cores."""

    job_id: str
    attempts: int
    cpu_s: float
    rss: int
    peak_rss: int
    cpu_cores: float
    nodes: tuple[str, ...] = ()


class UsageReply(Message, frozen=True, kw_only=True, tag="coordinator.usage"):
    """Measured usage: the series asked for, and the latest samples."""

    as_of: datetime
    since: datetime
    resolution: Literal["minute", "hour"]
    points: tuple[UsagePoint, ...] = ()
    nodes: tuple[NodeUsageNow, ...] = ()
    jobs: tuple[JobUsageNow, ...] = ()
