"""Measured usage between agents and the coordinator: sampling, rolling up, answering.

**On the agent** (:class:`UsageReporter`): every ``sample_interval`` seconds (``taskfarm agent
--sample-interval``, default 10, 0 turns it off) it samples its attempts' process groups
(:meth:`SubprocessExecutor.sample_usage`, which also stops attempts over the memory limit) and
the host (load, memory available, free space in the work directory), both read in a worker
thread, and leaves the result for the next heartbeat to carry: one sample per interval, never
a frame of its own.

**On the coordinator** (:class:`Telemetry`): each sample is folded, as it is read, into
in-memory accumulators of the current minute, one per (node, job) and one per node for its
host.  CPU and I/O arrive as each attempt's running totals; the difference from the attempt's
previous sample is what the minute used (an attempt seen for the first time, as after a
coordinator restart, counts everything it used so far in that minute).  Once a minute the
closed minutes are written to the :class:`UsageStore` (its own SQLite file, see
``persistence/_usage_store.py`` for why not the journal), complete hours are rolled up and
rows older than their retention are deleted (``taskfarm serve --keep-usage-minutes``, default
a day; ``--keep-usage-hours``, default a year).  Nothing per sample is journaled: the event
journal only gains each attempt's totals on its end event.  Answers (``taskfarm usage``,
``status --json``) read the store and the minute still in memory, so a sample shows up at
once.  CPU an attempt used between its last sample and its end is in its end event's total,
not in the series.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import anyio

from actors.executors import AttemptUsage, Executor, SubprocessExecutor, sample_host
from persistence import UsageRow, UsageStore
from runtime import Clock, ConfigurationError, get_logger

from ._usage_wire import (
    MAX_SAMPLED_ATTEMPTS,
    JobUsageNow,
    NodeUsage,
    NodeUsageNow,
    UsagePoint,
    UsageReply,
    UsageRequest,
)

__all__ = ["Telemetry", "TelemetrySettings", "UsageReporter", "usage_store_path"]

_log = get_logger("actors.telemetry")

_MINUTE = 60
_HOUR = 3600


def usage_store_path(journal: Path) -> Path:
    """Return the usage store that goes with ``journal`` (``farm.db`` -> ``farm.usage.db``)."""
    return journal.with_name(f"{journal.stem}.usage{journal.suffix or '.db'}")


# -- the agent ----------------------------------------------------------------------------------


class UsageReporter:
    """An agent's sampler: samples every ``interval`` seconds, hands the latest to a heartbeat."""

    def __init__(self, *, executor: Executor, clock: Clock, interval: float, scratch: Path) -> None:
        self._executor = executor
        self._clock = clock
        self._interval = interval
        self._scratch = scratch
        self._pending: NodeUsage | None = None

    async def run(self) -> None:
        """Sample until cancelled (returns at once when sampling is off)."""
        if self._interval <= 0:
            return
        while True:
            await self._clock.sleep(self._interval)
            await self.sample()

    async def sample(self) -> NodeUsage:
        """Sample the attempts and the host now; the next :meth:`take` returns it."""
        attempts: tuple[AttemptUsage, ...] = ()
        if isinstance(self._executor, SubprocessExecutor):
            attempts = await self._executor.sample_usage()
        host = await anyio.to_thread.run_sync(sample_host, self._scratch)
        usage = NodeUsage(host=host, attempts=attempts[:MAX_SAMPLED_ATTEMPTS])
        self._pending = usage
        return usage

    def take(self) -> NodeUsage | None:
        """Return the sample not sent yet (None: nothing new since the last)."""
        usage, self._pending = self._pending, None
        return usage


# -- the coordinator ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TelemetrySettings:
    """How long the coordinator keeps per-minute and per-hour usage rows (seconds).

    Raises:
        ConfigurationError: a retention is not positive, or minutes outlive hours.
    """

    minute_retention: float = 86_400.0
    hour_retention: float = 365 * 86_400.0

    def __post_init__(self) -> None:
        for name in ("minute_retention", "hour_retention"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= _MINUTE):
                raise ConfigurationError(
                    f"must be at least 60 seconds, got {value:g}", where=f"telemetry.{name}"
                )
        if self.hour_retention < self.minute_retention:
            raise ConfigurationError(
                "hours must be kept at least as long as minutes", where="telemetry.hour_retention"
            )


@dataclass(slots=True)
class _Bucket:
    samples: int = 0
    cpu_s: float = 0.0
    rss_max: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    load_max: float = 0.0
    memory_available_min: int = 0
    scratch_free_min: int = 0
    attempts_max: int = 0


def _low(current: int, value: int) -> int:
    """The least nonzero value (0 means "none yet")."""
    if current == 0:
        return value
    return min(current, value) if value else current


@dataclass(slots=True)
class _Latest:
    at: float
    usage: NodeUsage
    cpu_cores: float = 0.0
    by_attempt: dict[tuple[str, str, int], AttemptUsage] = field(default_factory=dict)


class Telemetry:
    """The coordinator's measured usage: accumulators, the store, the answers."""

    def __init__(
        self, *, store: UsageStore | None, clock: Clock, settings: TelemetrySettings
    ) -> None:
        self._store = store
        self._clock = clock
        self.settings = settings
        self._buckets: dict[tuple[int, str, str], _Bucket] = {}
        self._latest: dict[str, _Latest] = {}
        self.samples = 0

    # -- folding samples in --------------------------------------------------------------------

    def record(self, node: str, usage: NodeUsage) -> None:
        """Fold one of ``node``'s samples into the current minute (no I/O)."""
        self.samples += 1
        now = self._clock.now().timestamp()
        minute = int(now // _MINUTE) * _MINUTE
        previous = self._latest.get(node)
        before = previous.by_attempt if previous is not None else {}
        host = self._bucket(minute, node, "")
        host.samples += 1
        host.load_max = max(host.load_max, usage.host.load)
        host.memory_available_min = _low(host.memory_available_min, usage.host.memory_available)
        host.scratch_free_min = _low(host.scratch_free_min, usage.host.scratch_free)
        host.attempts_max = max(host.attempts_max, len(usage.attempts))
        jobs: dict[str, list[AttemptUsage]] = {}
        by_attempt: dict[tuple[str, str, int], AttemptUsage] = {}
        cpu_used = 0.0
        for attempt in usage.attempts:
            jobs.setdefault(attempt.job_id, []).append(attempt)
            by_attempt[(attempt.job_id, attempt.task_id, attempt.fencing_token)] = attempt
        for job_id, attempts in jobs.items():
            bucket = self._bucket(minute, node, job_id)
            bucket.samples += 1
            bucket.attempts_max = max(bucket.attempts_max, len(attempts))
            bucket.rss_max = max(bucket.rss_max, sum(a.rss for a in attempts))
            for attempt in attempts:
                last = before.get((attempt.job_id, attempt.task_id, attempt.fencing_token))
                cpu = attempt.cpu_s - (last.cpu_s if last is not None else 0.0)
                cpu_used += max(0.0, cpu)
                bucket.cpu_s += max(0.0, cpu)
                bucket.read_bytes += max(
                    0, attempt.read_bytes - (last.read_bytes if last is not None else 0)
                )
                bucket.write_bytes += max(
                    0, attempt.write_bytes - (last.write_bytes if last is not None else 0)
                )
        cores = 0.0
        if previous is not None and now > previous.at:
            cores = cpu_used / (now - previous.at)
        self._latest[node] = _Latest(at=now, usage=usage, cpu_cores=cores, by_attempt=by_attempt)

    def _bucket(self, minute: int, node: str, job: str) -> _Bucket:
        key = (minute, node, job)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
        return bucket

    def forget(self, node: str) -> None:
        """Drop ``node``'s latest sample (its agent went away: it no longer says "now")."""
        self._latest.pop(node, None)

    # -- writing -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush closed minutes once a minute, until cancelled (then flush what is left)."""
        try:
            while True:
                now = self._clock.now().timestamp()
                await self._clock.sleep(_MINUTE - now % _MINUTE + 0.5)
                await self.flush()
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.flush(everything=True)

    async def flush(self, *, everything: bool = False) -> None:
        """Write the closed minutes (all with ``everything``), roll up complete hours and
        delete rows past their retention."""
        now = self._clock.now().timestamp()
        current = int(now // _MINUTE) * _MINUTE
        closed = [key for key in self._buckets if everything or key[0] < current]
        rows = [_row(key, self._buckets.pop(key)) for key in closed]
        if self._store is None:
            return
        try:
            await self._store.add_minutes(rows)
            await self._store.roll_up(current)
            await self._store.prune(
                minutes_before=int(now - self.settings.minute_retention),
                hours_before=int(now - self.settings.hour_retention),
            )
        except Exception as error:
            # Usage is a derived view: losing a minute of it must not stop the coordinator.
            _log.error("usage_flush_failed", error=str(error), rows=len(rows))

    # -- answering -----------------------------------------------------------------------------

    def nodes_now(self) -> tuple[NodeUsageNow, ...]:
        """Return each connected node's latest sample."""
        return tuple(
            NodeUsageNow(
                node=node,
                at=datetime.fromtimestamp(latest.at, UTC),
                load=latest.usage.host.load,
                memory_available=latest.usage.host.memory_available,
                scratch_free=latest.usage.host.scratch_free,
                attempts=len(latest.usage.attempts),
                rss=sum(a.rss for a in latest.usage.attempts),
                cpu_cores=round(latest.cpu_cores, 3),
            )
            for node, latest in sorted(self._latest.items())
        )

    def jobs_now(self, job_ids: Iterable[str] | None = None) -> tuple[JobUsageNow, ...]:
        """Return the latest usage of each job's running attempts (of ``job_ids`` only when
        given), from the connected nodes' latest samples."""
        wanted = set(job_ids) if job_ids is not None else None
        found: dict[str, list[tuple[str, AttemptUsage, _Latest]]] = {}
        for node, latest in self._latest.items():
            for attempt in latest.usage.attempts:
                if wanted is None or attempt.job_id in wanted:
                    found.setdefault(attempt.job_id, []).append((node, attempt, latest))
        result = []
        for job_id, entries in sorted(found.items()):
            node_cpu = {
                node: sum(a.cpu_s for n, a, _ in entries if n == node) for node, _, _ in entries
            }
            all_cpu = {node: sum(a.cpu_s for a in lt.usage.attempts) for node, _, lt in entries}
            cores = sum(
                lt.cpu_cores * (node_cpu[node] / all_cpu[node] if all_cpu[node] else 0.0)
                for node, lt in {n: lt for n, _, lt in entries}.items()
            )
            result.append(
                JobUsageNow(
                    job_id=job_id,
                    attempts=len(entries),
                    cpu_s=round(sum(a.cpu_s for _, a, _ in entries), 3),
                    rss=sum(a.rss for _, a, _ in entries),
                    peak_rss=max(a.peak_rss for _, a, _ in entries),
                    cpu_cores=round(cores, 3),
                    nodes=tuple(sorted({node for node, _, _ in entries})),
                )
            )
        return tuple(result)

    async def query(self, request: UsageRequest) -> UsageReply:
        """Answer ``taskfarm usage``.

        Raises:
            JournalFileError: the usage store failed.
        """
        now = self._clock.now()
        since = request.since or now - timedelta(hours=1)
        start = int(since.timestamp())
        resolution: Literal["minute", "hour"]
        if request.resolution == "auto":
            kept = now.timestamp() - self.settings.minute_retention
            resolution = "minute" if start >= kept else "hour"
        else:
            resolution = request.resolution
        rows: list[UsageRow] = []
        minutes_from = start
        if self._store is not None:
            if resolution == "hour":
                # Hours rolled up, plus the minutes of the hour (or so) not rolled up yet.
                start -= start % _HOUR
                rows = await self._store.query(
                    "hour", since=start, node=request.node, job=request.job
                )
                minutes_from = max((h.bucket for h in rows), default=start - _HOUR) + _HOUR
            rows += await self._store.query(
                "minute", since=minutes_from, node=request.node, job=request.job
            )
        rows += self._memory_rows(minutes_from, request.node, request.job)
        points = _points(rows, _HOUR if resolution == "hour" else _MINUTE, job=request.job)
        nodes = self.nodes_now()
        if request.node is not None:
            nodes = tuple(n for n in nodes if n.node == request.node)
        jobs = self.jobs_now([request.job] if request.job is not None else None)
        if request.node is not None:
            jobs = tuple(j for j in jobs if request.node in j.nodes)
        return UsageReply(
            as_of=now, since=since, resolution=resolution, points=points, nodes=nodes, jobs=jobs
        )

    def _memory_rows(self, since: int, node: str | None, job: str | None) -> list[UsageRow]:
        return [
            _row(key, bucket)
            for key, bucket in self._buckets.items()
            if key[0] >= since
            and (node is None or key[1] == node)
            and (job is None or key[2] == job)
        ]


def _row(key: tuple[int, str, str], bucket: _Bucket) -> UsageRow:
    minute, node, job = key
    return UsageRow(
        bucket=minute,
        node=node,
        job=job,
        samples=bucket.samples,
        cpu_s=round(bucket.cpu_s, 6),
        rss_max=bucket.rss_max,
        read_bytes=bucket.read_bytes,
        write_bytes=bucket.write_bytes,
        load_max=bucket.load_max,
        memory_available_min=bucket.memory_available_min,
        scratch_free_min=bucket.scratch_free_min,
        attempts_max=bucket.attempts_max,
    )


def _points(rows: list[UsageRow], seconds: int, *, job: str | None) -> tuple[UsagePoint, ...]:
    """Sum rows into one point per bucket of ``seconds``: host rows give the host fields and
    the sample count, job rows the CPU, memory and I/O (a job's rows give everything when the
    question is about one job)."""
    # First merge rows of the same (bucket, node, job): the store's and memory's, minutes
    # re-bucketed into an hour.
    merged: dict[tuple[int, str, str], _Bucket] = {}
    for row in rows:
        key = (row.bucket - row.bucket % seconds, row.node, row.job)
        bucket = merged.get(key)
        if bucket is None:
            bucket = merged[key] = _Bucket()
        bucket.samples += row.samples
        bucket.cpu_s += row.cpu_s
        bucket.rss_max = max(bucket.rss_max, row.rss_max)
        bucket.read_bytes += row.read_bytes
        bucket.write_bytes += row.write_bytes
        bucket.load_max = max(bucket.load_max, row.load_max)
        bucket.memory_available_min = _low(bucket.memory_available_min, row.memory_available_min)
        bucket.scratch_free_min = _low(bucket.scratch_free_min, row.scratch_free_min)
        bucket.attempts_max = max(bucket.attempts_max, row.attempts_max)
    points: dict[int, _Bucket] = {}
    for (start, _, row_job), row_bucket in sorted(merged.items()):
        point = points.get(start)
        if point is None:
            point = points[start] = _Bucket()
        host = row_job == ""
        if host or job is not None:
            point.samples += row_bucket.samples
            point.attempts_max += row_bucket.attempts_max
        if host:
            point.load_max = max(point.load_max, row_bucket.load_max)
            point.memory_available_min = _low(
                point.memory_available_min, row_bucket.memory_available_min
            )
            point.scratch_free_min = _low(point.scratch_free_min, row_bucket.scratch_free_min)
        else:
            point.cpu_s += row_bucket.cpu_s
            point.rss_max += row_bucket.rss_max
            point.read_bytes += row_bucket.read_bytes
            point.write_bytes += row_bucket.write_bytes
    return tuple(
        UsagePoint(
            at=datetime.fromtimestamp(start, UTC),
            samples=point.samples,
            cpu_s=round(point.cpu_s, 3),
            cpu_cores=round(point.cpu_s / seconds, 3),
            rss_max=point.rss_max,
            read_bytes=point.read_bytes,
            write_bytes=point.write_bytes,
            load_max=point.load_max,
            memory_available_min=point.memory_available_min,
            scratch_free_min=point.scratch_free_min,
            attempts_max=point.attempts_max,
        )
        for start, point in sorted(points.items())
    )
