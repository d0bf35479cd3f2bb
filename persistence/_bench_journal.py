"""``taskfarm bench journal``: durable appends, replay and recovery, each beside a raw baseline.

Every figure is measured against raw ``sqlite3`` doing the same storage work in the same run,
on the same table layout and settings (WAL, ``synchronous=FULL``):

- durable appends: 100 tasks each appending one event at a time (``expected_version`` checked),
  against a raw ``executemany`` loop committing batches of 100 pre-encoded rows;
- replay: ``rebuild_all`` (read, decode, apply, every stream) against raw row iteration;
- recovery: ``rebuild_stream`` of one 100,000-event stream with a snapshot every 1,000 events
  and 1,000 events after the latest one (the worst case of that policy), against the same
  rebuild without snapshots.
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec

from runtime import BenchContext, Figure, Suite, SystemClock, percentile

from ._codec import Event, EventCodec
from ._replay import rebuild_all, rebuild_stream
from ._sqlite import open_sqlite_journal

__all__ = ["SUITE"]

APPENDERS = 100


class FrameRendered(Event, frozen=True, kw_only=True, tag="bench.frame_rendered"):
    job_id: str
    frame: int
    node_id: str
    seconds: float


class JobProgress(msgspec.Struct, frozen=True):
    frames: int = 0
    last_frame: int = -1
    render_seconds: float = 0.0


class BenchJobAggregate:
    state_type = JobProgress
    schema_version = 1

    def initial_state(self, stream_id: str) -> JobProgress:
        return JobProgress()

    def apply(self, state: JobProgress, event: Event) -> JobProgress:
        if isinstance(event, FrameRendered):
            return JobProgress(
                frames=state.frames + 1,
                last_frame=event.frame,
                render_seconds=state.render_seconds + event.seconds,
            )
        return state


def _codec() -> EventCodec:
    codec = EventCodec()
    codec.register(FrameRendered)
    return codec


def _event(job: int, frame: int) -> FrameRendered:
    return FrameRendered(
        job_id=f"job-{job}", frame=frame, node_id=f"node-{frame % 17}", seconds=1.5 + frame % 7
    )


async def _durable_appends(path: Path, per_appender: int) -> tuple[float, list[float], float]:
    """Return events/s, per-append latencies (s) and the mean commit group size."""
    latencies: list[float] = []
    async with open_sqlite_journal(path, clock=SystemClock(), codec=_codec()) as journal:
        await journal.append("warmup:0", [_event(0, 0)])

        async def appender(job: int) -> None:
            stream_id = f"job:{job}"
            clock = time.perf_counter
            record = latencies.append
            for frame in range(per_appender):
                started = clock()
                await journal.append(stream_id, [_event(job, frame)], expected_version=frame)
                record(clock() - started)

        started = time.perf_counter()
        async with anyio.create_task_group() as task_group:
            for job in range(APPENDERS):
                task_group.start_soon(appender, job)
        elapsed = time.perf_counter() - started
        mean_group = journal.statistics().mean_group
    return APPENDERS * per_appender / elapsed, latencies, mean_group


def _raw_inserts(path: Path, total: int) -> float:
    """Insert ``total`` pre-encoded rows with raw sqlite3, 100 per commit; return rows/s."""
    encoder = msgspec.json.Encoder()
    stamp = "2026-01-01T00:00:00.000000+00:00"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        rows = [
            (
                position,
                f"job:{position % APPENDERS}",
                position // APPENDERS + 1,
                "bench.frame_rendered",
                1,
                stamp,
                None,
                encoder.encode(_event(position % APPENDERS, position)).decode(),
            )
            for position in range(1, total + 1)
        ]
        started = time.perf_counter()
        for start in range(0, total, 100):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO events (position, stream_id, version, tag, schema_version,"
                " timestamp, correlation_id, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows[start : start + 100],
            )
            conn.execute("COMMIT")
        return total / (time.perf_counter() - started)
    finally:
        conn.close()


def _raw_iteration(path: Path) -> float:
    """Iterate every row of the events table with raw sqlite3; return rows/s."""
    conn = sqlite3.connect(path)
    try:
        started = time.perf_counter()
        cursor = conn.execute(
            "SELECT position, stream_id, version, tag, schema_version, timestamp,"
            " correlation_id, payload FROM events ORDER BY position"
        )
        count = 0
        while rows := cursor.fetchmany(10_000):
            for _row in rows:
                count += 1
        return count / (time.perf_counter() - started)
    finally:
        conn.close()


async def _create_empty(path: Path) -> None:
    async with open_sqlite_journal(path, clock=SystemClock(), codec=_codec()):
        pass


async def _replay(path: Path, rounds: int) -> tuple[float, int]:
    """Return the best events/s of ``rebuild_all`` over the file, and the event count."""
    aggregate = BenchJobAggregate()
    best = 0.0
    count = 0
    async with open_sqlite_journal(
        path, clock=SystemClock(), codec=_codec(), read_only=True
    ) as journal:
        count = await journal.last_position()
        for _ in range(rounds):
            started = time.perf_counter()
            states = await rebuild_all(journal, lambda _stream_id: aggregate)
            elapsed = time.perf_counter() - started
            assert sum(state.frames for state, _version in states.values()) == count
            best = max(best, count / elapsed)
    return best, count


async def _recovery(path: Path, events: int, every: int) -> tuple[float, float]:
    """Return the median ms of recovering one stream with snapshots, and without."""
    aggregate = BenchJobAggregate()
    stream_id = "job:big"
    async with open_sqlite_journal(path, clock=SystemClock(), codec=_codec()) as journal:
        state = aggregate.initial_state(stream_id)
        for version in range(0, events, every):
            batch = [_event(1, frame) for frame in range(version, version + every)]
            await journal.append(stream_id, batch, expected_version=version)
            for event in batch:
                state = aggregate.apply(state, event)
            if version + every < events:
                # The last `every` events stay after the latest snapshot (the worst case).
                await journal.save_snapshot(stream_id, version=version + every, state=state)
        expected = (state, events)
        samples = []
        for _ in range(7):
            started = time.perf_counter()
            result = await rebuild_stream(journal, stream_id, aggregate)
            samples.append(time.perf_counter() - started)
            assert result == expected
        started = time.perf_counter()
        result = await rebuild_stream(journal, stream_id, aggregate, use_snapshots=False)
        without = time.perf_counter() - started
        assert result == expected
    return statistics.median(samples[1:]) * 1000, without * 1000


async def run_suite(ctx: BenchContext) -> list[Figure]:
    """Measure the journal's figures (smaller sizes with ``ctx.quick``)."""
    per_appender = 20 if ctx.quick else 1000
    recovery_events = 10_000 if ctx.quick else 100_000
    total = APPENDERS * per_appender

    ctx.progress(f"journal: raw sqlite3 executemany baseline ({total:,} rows)")
    raw_path = ctx.workdir / "raw.db"
    await _create_empty(raw_path)
    raw_rate = await anyio.to_thread.run_sync(_raw_inserts, raw_path, total)

    ctx.progress(f"journal: {APPENDERS} concurrent appenders ({total:,} durable appends)")
    path = ctx.workdir / "appends.db"
    rate, latencies, mean_group = await _durable_appends(path, per_appender)

    ctx.progress("journal: replay (rebuild_all) and raw row iteration")
    rounds = 2 if ctx.quick else 3
    replay_rate, replayed = await _replay(path, rounds)
    raw_iteration = max(
        [await anyio.to_thread.run_sync(_raw_iteration, path) for _ in range(rounds)]
    )

    ctx.progress(f"journal: recovery of one {recovery_events:,}-event stream")
    with_snapshots, without = await _recovery(ctx.workdir / "recovery.db", recovery_events, 1000)

    return [
        Figure(
            name=f"durable appends, {APPENDERS} concurrent appenders, synchronous=FULL",
            value=rate,
            unit="events/s",
            baseline_name="raw sqlite3 executemany, 100 rows/commit",
            baseline_value=raw_rate,
            target=40_000,
            ratio_target=0.5,
            note=f"{total:,} appends, mean {mean_group:.0f} events/commit",
        ),
        Figure(
            name="append latency p50",
            value=percentile(latencies, 50) * 1000,
            unit="ms",
            better="lower",
        ),
        Figure(
            name="append latency p99",
            value=percentile(latencies, 99) * 1000,
            unit="ms",
            target=10,
            better="lower",
        ),
        Figure(
            name="replay all streams (read + decode + apply)",
            value=replay_rate,
            unit="events/s",
            baseline_name="raw sqlite3 row iteration",
            baseline_value=raw_iteration,
            target=400_000,
            note=f"{replayed:,} events, best of {rounds}",
        ),
        Figure(
            name=f"recover one stream of {recovery_events:,} events, snapshot every 1,000",
            value=with_snapshots,
            unit="ms",
            baseline_name="same stream without snapshots",
            baseline_value=without,
            target=10,
            better="lower",
            note="1,000 events after the latest snapshot; median of 6",
        ),
    ]


SUITE: Suite = run_suite
